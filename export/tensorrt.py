"""--target tensorrt: TensorRT engines built from ONNX graphs whose recurrent nodes are the project's plugins.

    python -m export CKPT --out ART --target tensorrt --dtype bfloat16     # ONNX graphs, and engines where possible
    python -m export.tensorrt ART                                          # build (or rebuild) the engines

ART/tensorrt/ holds prefill.onnx and decode.onnx (export/tensorrt_onnx.py), and where TensorRT (10.9 or newer,
for AOT plugins) and a CUDA GPU are present, prefill.plan and decode.plan with timing.cache. The engines are
strongly typed; prefill has one optimization profile (batch 1..max-batch, tokens 2..the longest prefill chunk),
decode one per batch bucket, each at exactly that batch so that a CUDA graph per bucket replays the kernels tuned
for it. The plugins' Triton kernels are compiled into the engines as PTX (plugins/register.py), so running them
needs neither Python nor Triton. Where the engines cannot be built, the manifest says why and the export prints the
command that builds them; the ONNX graphs are still checked, by ONNX Runtime running the plugin nodes' function
bodies against the eager model (float32 exports).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from contextlib import ExitStack
from pathlib import Path

from model import cli
from runtime.tensorrt_backend import NOT_BUILT

from .errors import ExportError

DIRECTORY = "tensorrt"
GRAPHS = {"prefill": False, "decode": True}    # role -> one token per row
TIMING_CACHE = f"{DIRECTORY}/timing.cache"
MAX_PREFILL_TOKENS = 512      # a longer prompt runs as chunks


def prefill_tokens(max_seq_len: int, longest: int = MAX_PREFILL_TOKENS) -> dict:
    """The prefill profile's token range (a prompt past `max` runs as chunks)."""
    top = max(2, min(longest, max_seq_len))
    return {"min": 2, "opt": min(top, 128), "max": top}


def cannot_build() -> str | None:
    """Why engines cannot be built on this machine, or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt, with a CUDA GPU)"
    import tensorrt as trt
    if not hasattr(trt, "QuickPluginCreationRequest"):
        return (f"TensorRT {trt.__version__} has no ahead-of-time Python plugins (tensorrt.plugin.aot_impl); "
                "use 10.9 or newer")
    if importlib.util.find_spec("triton") is None:
        return "the plugins' kernels are compiled by Triton, which is not installed (pip install triton)"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (engines are built on, and for, the GPU that runs them)"
    return None


def commands(directory: Path, manifest) -> list[str]:
    """The command that builds the engines, then trtexec lines for the same two graphs. trtexec cannot register
    Python plugins, so it builds the plugin nodes from their ONNX function bodies: engines to compare with."""
    entry = manifest.targets["tensorrt"]
    lines = [f"python -m export.tensorrt {directory}"]
    for role, decode in GRAPHS.items():
        t = entry["prefill_tokens"]
        dim = lambda d, batch, tokens: batch if d == "batch" else (1 if decode else tokens) if d == "sequence" else d  # noqa: E731
        shapes = {flag: ",".join(f"{s.name}:" + "x".join(str(dim(d, batch, tokens)) for d in s.shape)
                                 for s in manifest.inputs)
                  for flag, batch, tokens in (("min", 1, t["min"]), ("opt", 1, t["opt"]),
                                              ("max", manifest.max_batch, t["max"]))}
        lines.append(f"trtexec --onnx={directory}/{entry['files'][role]} --stronglyTyped "
                     + " ".join(f"--{flag}Shapes={v}" for flag, v in shapes.items())
                     + f" --timingCacheFile={directory}/{TIMING_CACHE} --saveEngine={directory}/{DIRECTORY}/{role}"
                     ".functions.plan")
    return lines


def check_options(args, config) -> None:
    """Refuse, before anything is loaded, what the tensorrt target cannot do for this model."""
    from plugins import PLUGINS
    from plugins.spec import PluginSpecError, evaluate

    from .tensorrt_onnx import model_dims
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if args.dtype == "float32" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--target tensorrt needs {' and '.join(missing)}: pip install 'next-deploy[onnx]'")
    dims = {**model_dims(config), "B": 1, "T": 2, "P": 1, "N": 1}
    try:
        for plugin in PLUGINS.values():
            shapes = [tuple(evaluate(e, dims) for e in t.dims) for t in plugin.inputs]
            plugin.launch(shapes, plugin.dtypes(args.dtype)[0], {"eps": config.rms_norm_eps})
    except PluginSpecError as e:
        raise ExportError(f"the TensorRT plugins cannot run this model: {e}") from e


def stages(args) -> int:
    """Progress lines the target prints: the graphs, the engines, and one per check."""
    engines = cannot_build() is None
    return 1 + (2 if engines else 0) + (args.dtype == "float32") + engines


def build(model, args, out: Path, stage) -> dict:
    """Write ART/tensorrt/ (ONNX graphs, engines where possible) and return the manifest's target entry."""
    import torch

    from model import Qwen3NextForCausalLM

    from .tensorrt_onnx import export_graphs
    with stage("exporting the TensorRT ONNX graphs (plugin nodes with ONNX function bodies)"):
        # Traced from a CPU copy, as the onnxruntime target's graph (torch.onnx.ops.symbolic traces on the CPU).
        cpu_model = model if args.device == "cpu" else Qwen3NextForCausalLM.from_pretrained(
            args.checkpoint, dtype=getattr(torch, args.dtype))
        entry = export_graphs(cpu_model, out, args.max_batch, args.max_seq_len, args.opset)
    entry.update(decode_buckets=args.decode_buckets, prefill_tokens=prefill_tokens(args.max_seq_len), engine=NOT_BUILT)
    reason = cannot_build()
    if reason:
        entry["engine_not_built"] = reason
        return entry
    engines, cache = build_engines(out, entry, args.max_batch, args.dtype, stage)
    for role, blob in engines.items():
        (out / entry["files"][f"{role}_engine"]).write_bytes(blob)
    (out / TIMING_CACHE).write_bytes(cache)
    return entry


def report(directory: Path, manifest) -> None:
    entry = manifest.targets["tensorrt"]
    if entry["engine"] != NOT_BUILT:
        print(f"tensorrt: engines built with TensorRT {entry['engine']['tensorrt']} for {entry['engine']['gpu']}")
        return
    if "tensorrt-onnx" not in manifest.parity:
        print(f"tensorrt: the {manifest.dtype} graphs were not run (ONNX Runtime's CPU kernels run them in float32 "
              "only, and no engine was built)")
    print(f"tensorrt: ONNX graphs written; engines not built: {entry['engine_not_built']}.\nBuild them on a machine "
          f"with TensorRT >= 10.9 and the GPU that will run them:")
    lines = commands(directory, manifest)
    print(f"  {lines[0]}\nor with trtexec, which cannot register Python plugins and so builds the plugin nodes from "
          "their ONNX function bodies (engines to compare with, not the runtime's):")
    for line in lines[1:]:
        print(f"  {line}")


def build_engines(directory: Path, entry: dict, max_batch: int, dtype: str, stage) -> tuple[dict, bytes]:
    """Serialized engines {role: bytes} and the timing cache; fills in the entry's engine facts and files."""
    import tensorrt as trt
    import torch

    import plugins.register  # noqa: F401  (registers the plugins with tensorrt.plugin)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = directory / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    started = time.perf_counter()
    engines = {}
    for role, decode in GRAPHS.items():
        with stage(f"building the TensorRT {role} engine"):
            network = _parse(builder, logger, directory / entry["files"][role], entry["plugin_nodes"][role], trt)
            config = builder.create_builder_config()
            timing = config.create_timing_cache(cache)
            config.set_timing_cache(timing, ignore_mismatch=False)
            if dtype == "float32":      # TensorRT multiplies float32 matrices in TF32 unless told not to
                config.clear_flag(trt.BuilderFlag.TF32)
            for batch, tokens in _profiles(entry, max_batch, decode):
                profile = builder.create_optimization_profile()
                for i in range(network.num_inputs):
                    tensor = network.get_input(i)
                    profile.set_shape(tensor.name, *(_dims(tensor.shape, b, t) for b, t in zip(batch, tokens)))
                config.add_optimization_profile(profile)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise ExportError(f"TensorRT could not build the {role} engine (its log above says why); nothing "
                                  "was written")
            engines[role] = bytes(blob)
            cache = bytes(config.get_timing_cache().serialize())
    for role in GRAPHS:
        entry["files"][f"{role}_engine"] = f"{DIRECTORY}/{role}.plan"
    entry["files"]["timing_cache"] = TIMING_CACHE
    major, minor = torch.cuda.get_device_capability()
    entry["engine"] = {"tensorrt": trt.__version__, "gpu": f"{torch.cuda.get_device_name()} (sm_{major}{minor})",
                       "build_seconds": round(time.perf_counter() - started, 1)}
    entry.pop("engine_not_built", None)
    return engines, cache


def _parse(builder, logger, path: Path, plugin_nodes: int, trt):
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):    # TensorRT 11 builds nothing else
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {path.name}: {errors}")
    # A plugin node whose plugin is not registered would be imported as its ONNX function body instead.
    found = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if found != plugin_nodes:
        raise ExportError(f"{path.name} has {plugin_nodes} plugin nodes but TensorRT imported {found} plugin layers; "
                          "the nextdeploy plugins were not registered (import plugins.register)")
    return network


def _profiles(entry: dict, max_batch: int, decode: bool):
    """(min, opt, max) batch and token counts of each optimization profile."""
    if decode:
        return [((b, b, b), (1, 1, 1)) for b in entry["decode_buckets"]]
    t = entry["prefill_tokens"]
    return [((1, 1, max_batch), (t["min"], t["opt"], t["max"]))]


def _dims(shape, batch: int, tokens: int) -> tuple:
    """A network input's shape with its dynamic dims filled in: batch first, then tokens (input_ids only)."""
    dims = list(shape)
    dims[0] = batch
    if len(dims) > 1 and dims[1] == -1:
        dims[1] = tokens
    return tuple(dims)


def verification_runs(directory: Path, manifest):
    """(parity name, engine opener) for the export's self-check: ONNX Runtime running the graphs through the
    plugins' function bodies (float32), and the engines themselves where they were built."""
    import runtime
    from runtime.tensorrt_backend import OnnxFunctionBackend
    entry = manifest.targets["tensorrt"]
    runs = []
    if manifest.dtype == "float32":
        runs.append(("tensorrt-onnx", lambda: runtime.Engine(directory, manifest,
                                                             OnnxFunctionBackend(directory, manifest))))
    if entry["engine"] != NOT_BUILT:
        runs.append(("tensorrt", lambda: runtime.load(directory, backend="tensorrt", device="cuda")))
    return runs


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m export.tensorrt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact",
                   help="artifact directory with a tensorrt target (python -m export ... --target tensorrt)")
    p.add_argument("--max-prefill-tokens", type=cli.integer(2, 1 << 20), default=MAX_PREFILL_TOKENS,
                   help="longest prompt chunk the prefill engine takes; longer prompts run as chunks "
                   "(default: %(default)s, or the artifact's max-seq-len if smaller)")
    p.add_argument("--verify-tokens", type=cli.integer(2, 1 << 16), default=48,
                   help="tokens in the parity check against the source checkpoint (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Build the engines into an existing artifact: all files, or none, replace the old ones."""
    args = parse_args(argv)
    from model.io import atomic_path
    from runtime.manifest import MANIFEST, Manifest, checkpoint_hash

    from .__main__ import Stages

    directory = Path(args.artifact)
    manifest = Manifest.load(directory)
    entry = manifest.targets.get("tensorrt")
    if entry is None:
        raise ExportError(f"{directory} has no tensorrt target (built: {', '.join(manifest.targets)}); export one "
                          f"with `python -m export CHECKPOINT --out {directory} --target tensorrt`")
    reason = cannot_build()
    if reason:
        raise ExportError(f"cannot build TensorRT engines here: {reason}")
    source = Path(manifest.source["path"])
    if not (source / "config.json").is_file():
        unchecked = f"the source checkpoint {source} is not there"
    elif checkpoint_hash(source) != manifest.source["sha256"]:
        unchecked = f"{source} has changed since the export"
    else:
        unchecked = None
    stage = Stages(len(GRAPHS) + 2)
    entry["prefill_tokens"] = prefill_tokens(manifest.max_seq_len, args.max_prefill_tokens)
    engines, cache = build_engines(directory, entry, manifest.max_batch, manifest.dtype, stage)
    manifest.parity.pop("tensorrt", None)
    if unchecked:
        print(f"note: {unchecked}, so the engines were not checked against the eager model")
    else:
        manifest.parity["tensorrt"] = _check_engines(directory, manifest, engines, source, args.verify_tokens, stage)
    with ExitStack() as files:
        # Entered first, renamed last: the manifest never names an engine that is not in place.
        manifest_tmp = files.enter_context(atomic_path(directory / MANIFEST))
        for role, blob in engines.items():
            files.enter_context(atomic_path(directory / entry["files"][f"{role}_engine"])).write_bytes(blob)
        files.enter_context(atomic_path(directory / TIMING_CACHE)).write_bytes(cache)
        manifest_tmp.write_text(manifest.to_json())
    print(f"engines written to {directory / DIRECTORY}")
    return 0


def _check_engines(directory: Path, manifest, engines: dict, source: Path, verify_tokens: int, stage) -> dict:
    """The new engines (not yet in the artifact) against the eager model of the source checkpoint."""
    import torch

    from model import Qwen3NextForCausalLM
    from runtime.compiled_backend import CompiledEngine
    from runtime.tensorrt_backend import TensorRTBackend

    from . import verify
    with stage("computing eager reference logits"):
        model = Qwen3NextForCausalLM.from_pretrained(source, dtype=getattr(torch, manifest.dtype))
        tokens = verify.fixed_tokens(model.config.vocab_size, min(verify_tokens, manifest.max_seq_len - 1) + 1)
        prefill = (tokens.shape[1] - 1) // 2
        reference = verify.reference_logits(model, tokens)
        eager_error = verify.dtype_error(model, tokens, reference)
        expected = reference[:, prefill - 1:-1]
    with stage("verifying the tensorrt engines against the eager model"):
        engine = CompiledEngine(directory, manifest, TensorRTBackend(directory, manifest, "cuda", engines=engines))
        figures = verify.parity(engine, tokens, expected, prefill)
        verify.check(figures, manifest.dtype, "tensorrt", eager_error)
    print(f"tensorrt: relative logit error {figures['rel_error']:.2e}, top-1 agreement "
          f"{figures['top1_agreement']:.3f}")
    return figures


if __name__ == "__main__":
    cli.run(main)
