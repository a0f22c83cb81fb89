"""--target compiled: the in-place step, compiled by Inductor for every shape the runtime runs at.

    python -m export CKPT --out ART --target compiled --device cuda --dtype bfloat16 --max-batch 32

ART/compiled/ then holds
  prefill.pt2, decode.pt2   the step as exported programs (dynamic batch and sequence, state updated in place):
                            what any machine with torch and a compiler compiles the engine from (the weights
                            in prefill.pt2, stand-ins for them in decode.pt2: export/graph.save_program);
  inductor-cache.bin        (CUDA) Inductor's compile cache, recorded while every shape was compiled here, so a
                            runtime with the same torch on the same GPU model starts warm;
  aoti/<shape>.pt2          (CPU) an AOTInductor package per shape, code only (the weights are the exported
                            program's), which loads without compiling and without a compiler.
Shapes: decode at each batch bucket, one-row prefill at each chunk length (runtime/compiled_backend.py runs them).
The programs compute each layer's projections over one input as one product, with the norms and residual adds
(model/fusion.py); their weights are stored stacked, so the programs' parameter names differ from the
checkpoint's there.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from model import Qwen3NextForCausalLM
from model.fusion import FUSED_LINEAR_MAX_ROWS, fuse_projections
from runtime.compiled_backend import (compile_options, compile_step, compiled_shapes, fingerprint, load_programs,
                                      shape_name)
from runtime.torch_backend import zeros_state

from .graph import InPlaceStepModule, export_steps

DIRECTORY = "compiled"


def build(model: Qwen3NextForCausalLM, out: Path, device: str, max_seq_len: int, buckets: list[int],
          chunks: list[int], specs, stage, autotune: bool = False, pdl: bool = False,
          fused_linear_rows: int = FUSED_LINEAR_MAX_ROWS) -> dict:
    """Write ART/compiled/ and return the manifest's target entry. `stage` prints one line per step; `autotune` and
    `pdl` (CUDA) are Inductor options (runtime/compiled_backend.compile_options), recorded for the runtime;
    `fused_linear_rows` goes into the programs (model/fusion.py)."""
    started = time.perf_counter()
    (out / DIRECTORY).mkdir()
    with stage("exporting the in-place step for the compiled target"):
        # A dynamic batch even for a batch-1 artifact: the decode buckets share one program. Projections that
        # share an input run as one product, with the norms and residual adds (model/fusion.py): fewer launches.
        step = InPlaceStepModule(fuse_projections(model, fused_linear_rows)).eval()
        files, custom_ops = export_steps(step, model, max(2, buckets[-1]), max_seq_len, out, DIRECTORY)
    # Compiled from the saved programs, as the runtime will: the same graphs give the same cache keys.
    programs = load_programs(out, files)
    if device == "cuda":
        forms = ["exported", "inductor_cache"]
        options = compile_options(autotune, pdl)
        for batch, tokens in compiled_shapes(buckets, chunks):
            with stage(f"compiling {shape_name(batch, tokens)} with Inductor"):
                compile_step(programs["decode" if tokens == 1 else "prefill"], specs, batch, tokens, device,
                             options=options)
        recorded = torch.compiler.save_cache_artifacts()
        if recorded is None:
            forms.remove("inductor_cache")   # caches are turned off here (TORCHINDUCTOR_FORCE_DISABLE_CACHES)
        else:
            files["inductor_cache"] = f"{DIRECTORY}/inductor-cache.bin"
            (out / files["inductor_cache"]).write_bytes(recorded[0])
    else:
        forms = ["exported", "aoti"]
        (out / DIRECTORY / "aoti").mkdir()
        for batch, tokens in compiled_shapes(buckets, chunks):
            name = shape_name(batch, tokens)
            with stage(f"compiling {name} with AOTInductor"):
                module = programs["decode" if tokens == 1 else "prefill"].module()
                example = (torch.zeros(batch, tokens, dtype=torch.long), *zeros_state(specs, batch, "cpu"))
                with torch.no_grad():
                    static = torch.export.export(module, example)
                files[f"aoti:{name}"] = f"{DIRECTORY}/aoti/{name}.pt2"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)   # torch's own pytree deprecations
                    torch._inductor.aoti_compile_and_package(
                        static, package_path=str(out / files[f"aoti:{name}"]),
                        inductor_configs={"aot_inductor.package_constants_in_so": False})
    return {"files": files, "forms": forms, "custom_ops": custom_ops, "decode_buckets": buckets,
            "prefill_chunks": chunks, "autotune": autotune, "pdl": pdl, "fused_linear_rows": fused_linear_rows,
            "compiled_with": fingerprint(device), "compile_seconds": round(time.perf_counter() - started, 1)}
