"""ONNX Runtime backend. CPU: state as NumPy arrays fed each step. CUDA: state stays on the GPU, bound with
IOBinding into two fixed sets of buffers that alternate as input and output (no host round trip per token), and
decode steps replay CUDA graphs: one per state set, since a step reads one set and writes the other (ONNX Runtime
GenAI found that updating shared buffers in place under capture biased the logits), in a session per batch size
whose batch and sequence dims are fixed (capture needs every node on the GPU; see _graph_session). A graph keeps
the addresses it was captured with, so a state's buffers, input ids and logits live in a slot that is reused,
never reallocated (runtime/slots.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest, TensorSpec
from .slots import SlotPool

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64"}
log = logging.getLogger("next_deploy.runtime")
# Tokens per run of a longer prompt. The exported attention is the plain masked one over the whole cache, so a
# T-token run makes [heads, T, max_seq_len] scores, and ONNX Runtime's arena keeps what they took: runs of 512
# bound that. Measured on the CPU (tiny, float32, a 2048-token prompt into a 2048-slot cache, 3 runs): one run
# 378 ms and 836 MiB of memory over the loaded session; 1024 203 ms, 416 MiB; 512 198 ms, 209 MiB; 256 210 ms;
# 128 214 ms, 44 MiB; logits identical.
PREFILL_CHUNK = 512


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


class _Slot:
    """One state's device buffers: two state sets (`current` is the live one), the decode input ids and logits,
    and for each set the graph id and IOBinding of the decode step that reads it."""

    def __init__(self, sets, ids, logits, graph_ids):
        self.sets, self.ids, self.logits, self.graph_ids = sets, ids, logits, graph_ids
        self.current = 0
        self.bindings = [None, None]


class OnnxRuntimeBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str, cuda_graphs: bool = True):
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
        self.vocab_size = manifest.model_config["vocab_size"]
        self.ort = ort
        self.path = path = str(directory / target["files"]["model"])
        # ONNX Runtime's CUDA provider multiplies float32 matrices in TF32 unless told not to (~1e-4 logit error).
        self.cuda_options = {"use_tf32": int(dtype != "float32")}
        providers = [("CUDAExecutionProvider", self.cuda_options), "CPUExecutionProvider"] if device == "cuda" else \
            ["CPUExecutionProvider"]
        self.shared_weights = None
        self.value_device = "cuda"
        try:
            self.session = ort.InferenceSession(path, self._session_options(), providers=providers)
        except Exception as e:  # ONNX Runtime raises its own exception types, one per status code
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path} cannot be loaded ({first_line}); the file is damaged or incomplete, "
                                "rebuild the artifact with `python -m export`") from e
        # Decode steps replay CUDA graphs in sessions of their own, one per batch size, made at its first step.
        self.cuda_graphs = device == "cuda" and cuda_graphs
        self.graph_sessions = {}
        manifest.check_graph(path, [_spec(a) for a in self.session.get_inputs()],
                             [_spec(a) for a in self.session.get_outputs()], named=True)
        # CUDA: state in slots of OrtValues on `value_device` (a test binds CPU OrtValues to check the logic)
        # ONNX Runtime keeps every graph it captured: slots (and their graph ids) are kept too, none released.
        self.slots = SlotPool(self._new_slot, release_other_shapes=False) if device == "cuda" else None
        self.graph_ids = 0
        self.run_options = {}

    def _zeros(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch, *s.shape[1:]], dtype=NP_DTYPES[s.dtype]) for s in self.specs]

    def _session_options(self, batch: int | None = None):
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        if batch is not None:
            options.add_free_dimension_override_by_name("batch", batch)
            options.add_free_dimension_override_by_name("sequence", 1)
        if batch is not None or self.device == "cuda":
            try:
                for name, value in self._shared_weights().items():
                    options.add_initializer(name, value)
            except Exception as e:   # ONNX Runtime refuses an initializer over memory it owns, or lacks DLPack
                log.warning("note: ONNX Runtime %s does not take the shared weight matrices (%s); each session loads "
                            "its own copy of them (ONNX Runtime 1.32 shares them)", self.ort.__version__,
                            str(e).strip().splitlines()[-1])
                self.shared_weights = {}
                return self._session_options(batch)
        return options

    def _shared_weights(self) -> dict:
        """The weight matrices as OrtValues on `value_device`, read from the file once and handed to every session
        on CUDA: ONNX Runtime uses an initializer supplied on the device it planned for in place, so the plain
        session and the graph sessions share one copy. (Small and integer constants stay each session's own: shape
        folding needs them.)"""
        if self.shared_weights is None:
            import onnx
            from onnx import numpy_helper
            model = onnx.load(self.path)
            self.shared_weights = {
                t.name: self._user_owned(numpy_helper.to_array(t)) for t in model.graph.initializer
                if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
        return self.shared_weights

    def _user_owned(self, array: np.ndarray):
        """An OrtValue on `value_device` over memory ONNX Runtime does not own, as SessionOptions.add_initializer
        requires: ONNX Runtime's own copy, seen again through DLPack (the view keeps the copy alive). A plain
        OrtValue.ortvalue_from_numpy onto CUDA is that copy, and refused."""
        ort = self.ort
        owned = ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, self.value_device, 0)
        owned.update_inplace(array)
        if hasattr(ort.OrtValue, "from_dlpack"):     # ONNX Runtime 1.32 on
            return ort.OrtValue.from_dlpack(owned)
        from onnxruntime.capi import _pybind_state as C   # before 1.32: (capsule, is_bool), in some builds only
        return ort.OrtValue(C.OrtValue.from_dlpack(owned._ortvalue.to_dlpack(), False), owned)

    def _graph_session(self, batch: int):
        """The session whose decode steps at this batch size are CUDA graphs, or None where ONNX Runtime refuses
        capture. A graph needs every node on the GPU; with the batch and sequence dims free, the CUDA provider leaves
        the shape arithmetic (Shape, Range, Concat into Reshape ...) on the CPU. Fixed, they fold into constants at
        load. They share the weight matrices with the plain session (_shared_weights)."""
        if batch not in self.graph_sessions:
            providers = [("CUDAExecutionProvider", {**self.cuda_options, "enable_cuda_graph": 1}),
                         "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
            try:
                self.graph_sessions[batch] = self.ort.InferenceSession(self.path, self._session_options(batch),
                                                                       providers=providers)
            except Exception as e:   # ONNX Runtime refuses capture when a compute node runs on the CPU
                log.warning("note: ONNX Runtime cannot run %s as CUDA graphs at batch %d (%s); decoding without them",
                            self.path, batch, str(e).strip().splitlines()[-1])
                self.cuda_graphs = False
                return None
        return self.graph_sessions[batch]

    def _run_host(self, ids, arrays):
        outputs = self.session.run(None, {"input_ids": ids, **dict(zip(self.names, arrays))})
        return outputs[0], outputs[1:]

    def _options(self, graph_id: int):
        """Run options naming the CUDA graph to capture or replay."""
        if graph_id not in self.run_options:
            options = self.run_options[graph_id] = self.ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return self.run_options[graph_id]

    # ---- states --------------------------------------------------------------------------------

    def new_state(self, batch: int):
        if self.slots is None:
            return self._zeros(batch)
        handle, reused = self.slots.take(batch)
        if reused:
            slot = handle.slot
            for values in slot.sets:
                for value, zeros in zip(values, self._zeros(batch)):
                    value.update_inplace(zeros)
            slot.current = 0
        return handle

    def clone_state(self, tensors):
        if self.slots is None:
            return [a.copy() for a in tensors]
        copy = self.new_state(tensors.slot.ids.shape()[0])
        self._write(copy.slot, self._read(tensors.slot))
        return copy

    def _new_slot(self, batch: int) -> _Slot:
        ort = self.ort
        self.graph_ids += 2
        return _Slot([self._to_device(self._zeros(batch)), self._to_device(self._zeros(batch))],
                     ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, self.value_device, 0),
                     ort.OrtValue.ortvalue_from_shape_and_type([batch, self.vocab_size], np.float32,
                                                               self.value_device, 0),
                     (self.graph_ids - 1, self.graph_ids))

    def _to_device(self, arrays):
        return [self.ort.OrtValue.ortvalue_from_numpy(a, self.value_device, 0) for a in arrays]

    @staticmethod
    def _read(slot: _Slot) -> list[np.ndarray]:
        return [v.numpy() for v in slot.sets[slot.current]]

    @staticmethod
    def _write(slot: _Slot, arrays) -> None:
        """Into the live set, in place: graphs captured over the slot keep their addresses."""
        for value, array in zip(slot.sets[slot.current], arrays):
            value.update_inplace(np.ascontiguousarray(array))

    # ---- steps ---------------------------------------------------------------------------------

    def step(self, ids: np.ndarray, tensors, rows: np.ndarray, batch: int) -> np.ndarray:
        if ids.shape[1] > PREFILL_CHUNK:
            for start in range(0, ids.shape[1], PREFILL_CHUNK):
                logits = self.step(ids[:, start:start + PREFILL_CHUNK], tensors, rows, batch)
            return logits
        whole = len(rows) == batch
        if self.slots is None:
            logits, new = self._run_host(ids, tensors if whole else [a[rows] for a in tensors])
            if whole:
                tensors[:] = new
            else:
                for a, n in zip(tensors, new):
                    a[rows] = n
            return logits
        slot = tensors.slot
        if whole and ids.shape[1] == 1 and self.cuda_graphs and self._graph_session(batch) is not None:
            return self._decode_graph(slot, ids, self.graph_sessions[batch])
        if whole:
            return self._step_bound(slot, ids)
        # Rows of different lengths prefill one at a time; that path goes through the host.
        current = self._read(slot)
        logits, new = self._run_host(ids, [a[rows] for a in current])
        for a, n in zip(current, new):
            a[rows] = n
        self._write(slot, current)
        return logits

    def _bind_state(self, binding, slot: _Slot) -> None:
        for name, value in zip(self.names, slot.sets[slot.current]):
            binding.bind_ortvalue_input(name, value)
        for name, value in zip(self.names, slot.sets[1 - slot.current]):
            binding.bind_ortvalue_output(f"present.{name}", value)

    def _step_bound(self, slot: _Slot, ids: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_output("logits", "cpu")
        self._bind_state(binding, slot)
        self.session.run_with_iobinding(binding)
        slot.current = 1 - slot.current
        return binding.copy_outputs_to_cpu()[0]

    def _decode_graph(self, slot: _Slot, ids: np.ndarray, session) -> np.ndarray:
        """ONNX Runtime runs a graph id normally a few times, then captures it, then replays it; every binding
        (ids, logits, both state sets) stays at its address throughout."""
        slot.ids.update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        side = slot.current
        if slot.bindings[side] is None:
            binding = slot.bindings[side] = session.io_binding()
            binding.bind_ortvalue_input("input_ids", slot.ids)
            binding.bind_ortvalue_output("logits", slot.logits)
            self._bind_state(binding, slot)
        session.run_with_iobinding(slot.bindings[side], self._options(slot.graph_ids[side]))
        slot.current = 1 - side
        return slot.logits.numpy().copy()   # (a CPU OrtValue's numpy() is a view of the bound buffer)
