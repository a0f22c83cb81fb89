"""TensorRT backend: the tensorrt target's engines (export/tensorrt.py) on a CUDA GPU, the state kept there.

Buffers are torch CUDA tensors bound with `set_tensor_address`; steps run with `execute_async_v3` on one stream.
A state lives in a slot of its batch bucket (runtime/slots.py): rows past its batch are padding that decode steps
along with the real rows, as in the compiled backend. Decode runs the decode engine at the bucket's own profile; after
a first enqueue it is captured as a CUDA graph and replayed, one graph per slot and buffer set, since a graph keeps
the addresses it was captured with. Prompts run through the prefill engine on the real rows (in chunks up to its
profile's longest), one row at a time when rows differ in length.

In place, as TensorRT Edge-LLM does it: a DeltaNet state read only by the plugin that writes it (the manifest's
`in_place` lists them) is bound as both the past input and the present output, with no aliasing declared to the
builder; the plugins' kernels are written to read each value before anything overwrites it. Every other state (KV
caches, lengths) may be read after its present output is written: decode steps alternate two buffers for it, and
prefill writes it to a fresh buffer and copies back the rows it ran.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest
from .onnx_backend import OnnxRuntimeBackend, _import_ort
from .slots import SlotPool
from .torch_backend import zeros_state

ALIGNMENT = 256      # bytes; TensorRT's alignment for I/O addresses
NOT_BUILT = "not built"   # the manifest's tensorrt "engine" where the export could not build the engines


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ArtifactError("the tensorrt backend needs NVIDIA TensorRT 10.9 or newer: pip install tensorrt (with a "
                            "CUDA GPU)") from e
    return trt


def prefill_chunks(tokens: int, longest: int) -> list[int]:
    """Split a prompt into prefill calls of 2..longest tokens (the prefill profile's range); one token alone runs
    as a decode step."""
    chunks = []
    while tokens > longest:
        step = longest if tokens - longest != 1 else longest - 1
        chunks.append(step)
        tokens -= step
    return chunks + [tokens]


class _Slot:
    """One bucket's buffers: per state tensor a live buffer, and a spare one unless decode updates it in place (the
    two swap roles at each decode step: `parity`); the decode input ids and logits; the CUDA graphs captured over
    them, one per parity."""

    def __init__(self, tensors, spares, ids, logits):
        self.tensors, self.spares, self.ids, self.logits = tensors, spares, ids, logits
        self.parity = 0
        self.graphs = {}

    @property
    def bucket(self) -> int:
        return self.ids.shape[0]

    def live(self, i: int):
        return self.tensors[i] if self.parity == 0 or self.spares[i] is None else self.spares[i]

    def spare(self, i: int):
        if self.spares[i] is None:
            return self.tensors[i]
        return self.spares[i] if self.parity == 0 else self.tensors[i]


class TensorRTBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str, cuda_graphs: bool = True,
                 engines: dict | None = None):
        target = manifest.targets.get("tensorrt")
        if target is None:
            raise ArtifactError(f"{directory} has no tensorrt target (built: {', '.join(manifest.targets)}); "
                                "re-export with --target tensorrt")
        if target["engine"] == NOT_BUILT and engines is None:
            raise ArtifactError(f"{directory} holds the TensorRT ONNX graphs but no engines (not built at export: "
                                f"{target['engine_not_built']}); build them on a machine with TensorRT >= 10.9 and a "
                                f"GPU: python -m export.tensorrt {directory}")
        if device != "cuda":
            raise ArtifactError("the tensorrt backend runs on a CUDA GPU; load it with device='cuda'")
        trt = _import_tensorrt()
        import torch
        from model.device import torch_device
        self.device = torch_device("cuda")
        self.trt, self.torch = trt, torch
        self.specs = manifest.state
        self.names = [s.name for s in self.specs]
        self.vocab_size = manifest.model_config["vocab_size"]
        self.buckets = target["decode_buckets"]
        self.longest_prefill = target["prefill_tokens"]["max"]
        self.in_place = {role: set(names) for role, names in target["in_place"].items()}
        # Decode steps alternate two buffers for a state they do not update in place; prefill copies back instead.
        self.has_spare = [name not in self.in_place["decode"] for name in self.names]
        self.graphs = cuda_graphs
        self.stream = torch.cuda.Stream()
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engines = {}
        for role in ("prefill", "decode"):
            blob = engines[role] if engines else (directory / target["files"][f"{role}_engine"]).read_bytes()
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                built = target["engine"]
                raise ArtifactError(f"this TensorRT ({trt.__version__}) cannot load {directory}'s {role} engine, built "
                                    f"with TensorRT {built['tensorrt']} for {built['gpu']}; rebuild it here: "
                                    f"python -m export.tensorrt {directory}")
            self._check_io(engine, role)
            self.engines[role] = engine
        self.prefill_context = self.engines["prefill"].create_execution_context()
        self.decode_contexts = {}
        for profile, bucket in enumerate(self.buckets):
            context = self.engines["decode"].create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.decode_contexts[bucket] = context
        self.slots = SlotPool(self._new_slot)

    def _check_io(self, engine, role: str) -> None:
        trt, torch = self.trt, self.torch
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int64: torch.int64, trt.int32: torch.int32}
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        expected = [("input_ids", "int64"), ("logits", "float32")] + \
            [(name, s.dtype) for s in self.specs for name in (s.name, f"present.{s.name}")]
        for name, dtype in expected:
            if name not in names or dtypes.get(engine.get_tensor_dtype(name)) != getattr(torch, dtype):
                raise ArtifactError(f"the {role} engine's {name} is not the {dtype} tensor the manifest describes; "
                                    "rebuild the engines: python -m export.tensorrt ARTIFACT")

    # ---- states ----------------------------------------------------------------------------------

    def _new_slot(self, bucket: int) -> _Slot:
        torch = self.torch
        tensors = zeros_state(self.specs, bucket, self.device)
        spares = [torch.zeros_like(t) if spare else None for t, spare in zip(tensors, self.has_spare)]
        return _Slot(tensors, spares, torch.zeros(bucket, 1, dtype=torch.int64, device=self.device),
                     torch.zeros(bucket, self.vocab_size, dtype=torch.float32, device=self.device))

    def new_state(self, batch: int):
        bucket = next(b for b in self.buckets if b >= batch)    # the engine keeps batch <= max_batch, the last
        handle, reused = self.slots.take(bucket)
        if reused:
            handle.slot.parity = 0
            for t in handle.slot.tensors:
                t.zero_()
        return handle

    def clone_state(self, handle):
        source = handle.slot
        copy, _ = self.slots.take(source.bucket)
        copy.slot.parity = 0
        for i, t in enumerate(copy.slot.tensors):
            t.copy_(source.live(i))
        return copy

    # ---- steps -----------------------------------------------------------------------------------

    def step(self, ids: np.ndarray, handle, rows: np.ndarray, batch: int) -> np.ndarray:
        return self.step_on_device(ids, handle, rows, batch).cpu().numpy()

    def step_on_device(self, ids: np.ndarray, handle, rows: np.ndarray, batch: int):
        """Logits [len(rows), vocab] float32, on the GPU."""
        torch, slot = self.torch, handle.slot
        whole = len(rows) == batch
        if ids.shape[1] == 1 and whole:
            return self._decode(slot, ids[:, 0], batch)
        if whole:
            return self._rows(slot, 0, batch, ids)
        return torch.cat([self._rows(slot, int(r), int(r) + 1, ids[i:i + 1]) for i, r in enumerate(rows)])

    def _rows(self, slot: _Slot, first: int, end: int, ids: np.ndarray):
        """Feed rows first..end-1 their tokens in prefill chunks; a one-token prompt of one row is a decode step of
        batch 1 (a whole batch's runs through _decode)."""
        tokens = self.torch.from_numpy(np.ascontiguousarray(ids)).to(self.device)
        start = 0
        for n in prefill_chunks(ids.shape[1], self.longest_prefill):
            role, context = ("decode", self.decode_contexts[1]) if n == 1 else ("prefill", self.prefill_context)
            logits = self._run_rows(context, role, slot, first, end, tokens[:, start:start + n])
            start += n
        return logits

    def _run_rows(self, context, role: str, slot: _Slot, first: int, end: int, ids):
        """One enqueue over rows first..end-1 of the live buffers. Misaligned row views are staged; the present
        output of a state that is not updated in place goes to a fresh buffer, copied back afterwards."""
        torch = self.torch
        bind, back = {"input_ids": ids}, []
        for i, name in enumerate(self.names):
            view = slot.live(i)[first:end]
            past = view if view.data_ptr() % ALIGNMENT == 0 else view.clone()
            present = past if name in self.in_place[role] else torch.empty_like(view)
            bind[name], bind[f"present.{name}"] = past, present
            if present is not view:
                back.append((view, present))
        bind["logits"] = logits = torch.empty(end - first, self.vocab_size, dtype=torch.float32, device=self.device)
        self._enqueue(context, bind)
        with torch.cuda.stream(self.stream):
            for view, present in back:
                view.copy_(present)
        torch.cuda.current_stream().wait_stream(self.stream)
        return logits

    def _bind(self, context, tensors: dict) -> None:
        for name, t in tensors.items():
            if not name.startswith("present.") and name != "logits":
                context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())

    def _enqueue(self, context, tensors: dict) -> None:
        self._bind(context, tensors)
        self.stream.wait_stream(self.torch.cuda.current_stream())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise ArtifactError("TensorRT failed to run the engine (its log above says why)")

    def _decode(self, slot: _Slot, ids: np.ndarray, batch: int):
        """A decode step over the whole bucket; the states not updated in place swap buffers."""
        torch = self.torch
        slot.ids[:batch, 0].copy_(torch.from_numpy(ids))
        context = self.decode_contexts[slot.bucket]
        graph = slot.graphs.get(slot.parity)
        if graph is not None:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                graph.replay()
        else:
            bind = {"input_ids": slot.ids, "logits": slot.logits}
            for i, name in enumerate(self.names):
                bind[name] = slot.live(i)
                bind[f"present.{name}"] = slot.spare(i)     # the live buffer itself for an in-place state
            self._enqueue(context, bind)
            if self.graphs:
                # Captured after that first enqueue at these shapes and addresses; capturing runs nothing.
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                    context.execute_async_v3(self.stream.cuda_stream)
                slot.graphs[slot.parity] = graph
        torch.cuda.current_stream().wait_stream(self.stream)
        slot.parity = 1 - slot.parity
        return slot.logits[:batch]


class OnnxFunctionBackend(OnnxRuntimeBackend):
    """The tensorrt target's ONNX graphs in ONNX Runtime on CPU, each plugin node run as its ONNX function body:
    the export's check of the graphs' wiring, shapes and state where no engine can run. NumPy state, as the
    onnxruntime backend on CPU; a one-token step runs decode.onnx, longer ones prefill.onnx."""

    def __init__(self, directory: Path, manifest: Manifest):
        ort = _import_ort()
        target = manifest.targets["tensorrt"]
        if manifest.dtype != "float32":
            raise ArtifactError("ONNX Runtime's CPU kernels run the tensorrt graphs in float32 only")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = {role: ort.InferenceSession(str(directory / target["files"][role]), options,
                                                    providers=["CPUExecutionProvider"])
                         for role in ("prefill", "decode")}
        self.device, self.ort, self.specs = "cpu", ort, manifest.state
        self.names = [s.name for s in self.specs]
        self.cuda_graphs, self.slots = False, None

    def _run_host(self, ids, arrays):
        session = self.sessions["decode" if ids.shape[1] == 1 else "prefill"]
        outputs = session.run(None, {"input_ids": ids, **dict(zip(self.names, arrays))})
        return outputs[0], outputs[1:]


__all__ = ["TensorRTBackend", "OnnxFunctionBackend"]
