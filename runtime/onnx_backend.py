"""ONNX Runtime backend. CPU: state as NumPy arrays fed each step. CUDA: state stays on the GPU, bound with
IOBinding into two fixed sets of buffers that alternate as input and output (no host round trip per token)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest, TensorSpec

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ArtifactError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime "
                            "(or onnxruntime-gpu for device='cuda')") from e
    return ort


def _spec(arg) -> TensorSpec:
    """An ONNX Runtime graph input or output as the manifest describes tensors."""
    return TensorSpec(arg.name, list(arg.shape), ORT_TYPES.get(arg.type, arg.type))


class OnnxRuntimeBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str):
        ort = _import_ort()
        target = manifest.targets.get("onnxruntime")
        if target is None:
            raise ArtifactError(f"{directory} has no onnxruntime target (built: {', '.join(manifest.targets)}); "
                                "re-export with --target onnxruntime")
        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ArtifactError("device='cuda' needs ONNX Runtime's CUDA execution provider: "
                                "pip install onnxruntime-gpu (and a CUDA GPU)")
        if target["gated_delta_op"].endswith("GatedDeltaNet") and device == "cpu":
            raise ArtifactError(f"{directory} was exported for CUDA (GatedDeltaNet has no CPU kernel); "
                                "run it with device='cuda' or re-export with --device cpu")
        dtype = manifest.dtype
        if dtype == "bfloat16":
            raise ArtifactError("NumPy has no bfloat16 for feeding state; re-export with --dtype float16 or float32")
        self.device = device
        self.specs = manifest.state
        self.names = [s.name for s in self.specs]
        # ONNX Runtime's CUDA provider multiplies float32 matrices in TF32 unless told not to (~1e-4 logit error).
        cuda = ("CUDAExecutionProvider", {"use_tf32": int(dtype != "float32")})
        providers = [cuda, "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        path = directory / target["files"]["model"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own exception types, one per status code
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} cannot be loaded ({first_line}); the file is damaged or incomplete, "
                                "rebuild the artifact with `python -m export`") from e
        manifest.check_graph(str(path), [_spec(a) for a in self.session.get_inputs()],
                             [_spec(a) for a in self.session.get_outputs()], named=True)
        self.ort = ort

    def _zeros(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch, *s.shape[1:]], dtype=NP_DTYPES[s.dtype]) for s in self.specs]

    def _run_host(self, ids, arrays):
        outputs = self.session.run(None, {"input_ids": ids, **dict(zip(self.names, arrays))})
        return outputs[0], outputs[1:]

    # ---- CPU: NumPy state ----------------------------------------------------------------------

    def new_state(self, batch: int):
        arrays = self._zeros(batch)
        if self.device == "cpu":
            return arrays
        return [self._to_device(arrays), self._to_device(self._zeros(batch))]  # current, spare

    def clone_state(self, tensors):
        if self.device == "cpu":
            return [a.copy() for a in tensors]
        return [self._to_device(self._to_host(tensors[0])), self._to_device(self._to_host(tensors[1]))]

    def step(self, ids: np.ndarray, tensors, rows: np.ndarray, batch: int) -> np.ndarray:
        whole = len(rows) == batch
        if self.device == "cpu":
            logits, new = self._run_host(ids, tensors if whole else [a[rows] for a in tensors])
            if whole:
                tensors[:] = new
            else:
                for a, n in zip(tensors, new):
                    a[rows] = n
            return logits
        if whole:
            return self._step_bound(ids, tensors)
        # Rows of different lengths prefill one at a time; that path goes through the host.
        current = self._to_host(tensors[0])
        logits, new = self._run_host(ids, [a[rows] for a in current])
        for a, n in zip(current, new):
            a[rows] = n
        tensors[0] = self._to_device(current)
        return logits

    # ---- CUDA: OrtValues and IOBinding ----------------------------------------------------------

    def _to_device(self, arrays):
        return [self.ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays]

    @staticmethod
    def _to_host(values):
        return [v.numpy() for v in values]

    def _step_bound(self, ids: np.ndarray, tensors) -> np.ndarray:
        current, spare = tensors
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        for name, value in zip(self.names, current):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name, value in zip(self.names, spare):
            binding.bind_ortvalue_output(f"present.{name}", value)
        self.session.run_with_iobinding(binding)
        tensors[0], tensors[1] = spare, current
        return binding.copy_outputs_to_cpu()[0]
