"""What a bench run measures: the target (artifact or checkpoint), and each backend opened as a runtime Engine.

Backends are every name in `runtime.BACKENDS` (opened with `runtime.load`, so a backend added there is measured
with no change here) plus `hf`, transformers' Qwen3NextForCausalLM on the source checkpoint. A backend that
cannot run is not dropped: `Unavailable` carries the reason (not built into the artifact, with the export command
that adds it; a package to install; no source checkpoint; ...), and the report lists it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import runtime
from model.errors import NextDeployError
from runtime.manifest import MANIFEST, ArtifactError, Manifest, TensorSpec, checkpoint_hash, is_artifact

EXTRA_BACKENDS = ("hf",)
CHECKPOINT_BACKENDS = ("eager", "hf")   # run the source checkpoint, not files of the artifact


class BenchError(NextDeployError):
    """A bench command line that cannot be carried out."""


class Unavailable(Exception):
    """A backend that cannot run here; str() is the reason, naming the fix."""


def known_backends() -> list[str]:
    return list(runtime.BACKENDS) + [b for b in EXTRA_BACKENDS if b not in runtime.BACKENDS]


@dataclass
class Target:
    path: Path
    kind: str                       # "artifact" or "checkpoint"
    manifest: Manifest              # the artifact's, or one describing the checkpoint at the bench's capacity
    checkpoint: Path | None         # the source checkpoint when it is present and unchanged
    checkpoint_problem: str | None  # why there is none

    def manifest_sha256(self) -> str | None:
        import hashlib
        if self.kind != "artifact":
            return None
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()


def open_target(path: str, device: str, dtype: str | None, checkpoint: str | None, max_batch: int,
                max_seq_len: int | None) -> Target:
    """An artifact directory (manifest.json) or an HF-format checkpoint (config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise BenchError(f"{path} does not exist; pass an artifact directory (`python -m export` writes one) or "
                         "a checkpoint directory (`python -m train` writes one)")
    if is_artifact(path):
        manifest = Manifest.load(path)
        if dtype is not None and dtype != manifest.dtype:
            raise BenchError(f"{path} is a {manifest.dtype} artifact; --dtype applies to checkpoints only (export "
                             f"a {dtype} artifact with `python -m export ... --dtype {dtype}`)")
        source = Path(checkpoint or manifest.source["path"])
        problem = None
        if not (source / "config.json").is_file():
            problem = (f"the artifact's source checkpoint {source} is not there; pass --checkpoint DIR (the "
                       "directory it was exported from)")
        elif checkpoint_hash(source) != manifest.source["sha256"]:
            problem = (f"{source} is not the checkpoint this artifact was exported from (its hash differs); pass "
                       "the original with --checkpoint")
        return Target(path, "artifact", manifest, None if problem else source, problem)
    if (path / "config.json").is_file():
        if checkpoint is not None:
            raise BenchError("--checkpoint names the source of an artifact; the target is already a checkpoint")
        return Target(path, "checkpoint", _checkpoint_manifest(path, device, dtype or "float32", max_batch,
                                                               max_seq_len), path, None)
    raise BenchError(f"{path} is neither an artifact (no {MANIFEST}) nor a checkpoint (no config.json); pass the "
                     "directory `python -m export` or `python -m train` wrote")


def _checkpoint_manifest(path: Path, device: str, dtype: str, max_batch: int, max_seq_len: int | None) -> Manifest:
    """What runtime.Engine needs to run a checkpoint's eager and hf backends."""
    import torch
    from model import InferenceState, Qwen3NextConfig

    config = Qwen3NextConfig.load(path)
    seq = min(max_seq_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        state = InferenceState(config, 1, seq, dtype=getattr(torch, dtype), device="meta")
    specs = [TensorSpec(n, ["batch", *t.shape[1:]], str(t.dtype).removeprefix("torch."))
             for n, t in zip(state.names(), state.tensors())]
    return Manifest(model_config=config.to_dict(), dtype=dtype, device=device, max_batch=max_batch,
                    max_seq_len=seq, targets={}, inputs=[], outputs=[], state=specs,
                    source={"path": str(path.resolve()), "sha256": checkpoint_hash(path)},
                    tokenizer="tokenizer.json" if (path / "tokenizer.json").is_file() else None)


def why_unavailable(name: str, target: Target) -> str | None:
    """The reason `name` cannot run on `target`, from what can be seen without loading anything."""
    from export.__main__ import TARGETS
    if name in CHECKPOINT_BACKENDS:
        if name == "hf" and importlib.util.find_spec("transformers") is None:
            return "needs transformers: pip install transformers (or pip install -e '.[dev]')"
        return target.checkpoint_problem
    m = target.manifest
    if target.kind == "checkpoint":
        return (f"runs an exported artifact, and {target.path} is a checkpoint; export one with `python -m export "
                f"{target.path} --out ARTIFACT_DIR --target {name}` and bench ARTIFACT_DIR")
    if name not in m.targets:
        if name not in TARGETS:
            return f"not built into the artifact, and this version's `python -m export` has no {name} target"
        targets = " ".join(sorted({*m.targets, name}))
        return (f"not built into the artifact (it holds {', '.join(m.targets) or 'nothing'}); add it with `python -m "
                f"export {m.source['path']} --out {target.path} --overwrite --target {targets} --device {m.device} "
                f"--dtype {m.dtype} --max-batch {m.max_batch} --max-seq-len {m.max_seq_len}`")
    return None


def open_engine(name: str, target: Target, device: str) -> runtime.Engine:
    """The backend as a runtime Engine; raises Unavailable with the reason when it cannot be opened."""
    reason = why_unavailable(name, target)
    if reason:
        raise Unavailable(reason)
    try:
        if name == "hf" or target.kind == "checkpoint":
            return _engine(name, target, device)
        return runtime.load(target.path, backend=name, device=device,
                            checkpoint=str(target.checkpoint) if name == "eager" else None)
    except ModuleNotFoundError as e:
        raise Unavailable(f"needs the {e.name} package, which is not installed: pip install {e.name}") from e
    except ArtifactError as e:
        raise Unavailable(str(e)) from e


def _engine(name: str, target: Target, device: str) -> runtime.Engine:
    m = target.manifest
    if name == "hf":
        from .hf_backend import TransformersBackend
        impl = TransformersBackend(target.checkpoint, m.dtype, device)
    else:
        from runtime.eager_backend import EagerBackend
        impl = EagerBackend(m, device, str(target.checkpoint))
    tokenizer = runtime.load_tokenizer(target.path if target.kind == "artifact" else target.checkpoint, m)
    return runtime.Engine(target.path, m, impl, tokenizer)


def describe(target: Target) -> dict:
    m = target.manifest
    return {"path": str(target.path), "kind": target.kind, "dtype": m.dtype, "device": m.device,
            "max_batch": m.max_batch, "max_seq_len": m.max_seq_len, "targets": sorted(m.targets),
            "source_checkpoint": m.source["path"], "source_sha256": m.source["sha256"],
            "manifest_sha256": target.manifest_sha256(), "parity_at_export": m.parity or None,
            "model_config": json.loads(json.dumps(m.model_config))}
