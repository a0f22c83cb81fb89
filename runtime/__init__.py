"""Run exported artifacts: stateful prefill / decode / generate behind one small API.

    import runtime
    eng = runtime.load("artifacts/tiny", backend="onnxruntime", device="cpu")
    state = eng.new_state(batch_size=1)
    logits = eng.prefill([[1, 2, 3]], state)
    logits = eng.decode([4], state)

The onnxruntime backend imports neither torch nor the model code's torch parts.
"""

from __future__ import annotations

from pathlib import Path

from .engine import Engine, InputError, State
from .manifest import ArtifactError, Manifest

BACKENDS = ("onnxruntime", "torch", "eager", "compiled", "tensorrt")
__all__ = ["load", "load_tokenizer", "Engine", "State", "Manifest", "ArtifactError", "InputError", "BACKENDS"]


def load(directory, backend: str = "onnxruntime", device: str = "cpu", checkpoint: str | None = None, *,
         form: str = "auto", cuda_graphs: bool = True) -> Engine:
    """Open an artifact directory written by `python -m export`. `checkpoint` overrides where the eager
    backend finds the source checkpoint (its hash must match the manifest's). compiled backend: `form` 'aoti'
    or 'exported' (default: the AOTInductor packages where the artifact holds them and this machine matches the
    one they were compiled on, else the exported programs, compiled here). On CUDA, the compiled, onnxruntime and
    tensorrt backends replay decode steps as CUDA graphs unless `cuda_graphs` is False."""
    directory = Path(directory)
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in ("cpu", "cuda"):
        raise ArtifactError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    manifest = Manifest.load(directory)
    engine = Engine
    if backend == "onnxruntime":
        from .onnx_backend import OnnxRuntimeBackend
        impl = OnnxRuntimeBackend(directory, manifest, device, cuda_graphs)
    elif backend == "torch":
        from .torch_backend import TorchExportBackend
        impl = TorchExportBackend(directory, manifest, device)
    elif backend == "compiled":
        from .compiled_backend import CompiledBackend, CompiledEngine
        impl, engine = CompiledBackend(directory, manifest, device, form, cuda_graphs), CompiledEngine
    elif backend == "tensorrt":
        from .compiled_backend import CompiledEngine
        from .tensorrt_backend import TensorRTBackend
        impl, engine = TensorRTBackend(directory, manifest, device, cuda_graphs), CompiledEngine
    else:
        from .eager_backend import EagerBackend
        impl = EagerBackend(manifest, device, checkpoint)
    return engine(directory, manifest, impl, load_tokenizer(directory, manifest))


def load_tokenizer(directory: Path, manifest: Manifest):
    """The manifest's tokenizer file in `directory`, or None when it names none or the file is not there (the
    engine then takes and returns token ids only)."""
    if not manifest.tokenizer or not (directory / manifest.tokenizer).is_file():
        return None
    from model.tokenizer import Tokenizer
    return Tokenizer.load(directory / manifest.tokenizer)
