"""Compiled backend: the artifact's `compiled` target as Inductor-compiled code, on CPU or CUDA.

One compiled graph per shape the engine runs at: decode at each batch bucket (one token per row) and prefill of
one row at each chunk length. A state of B rows lives in the buffers of the smallest bucket that holds B; the rows
past B are padding that decode steps along with the real rows. Rows never mix in the model, and a padding row
never outgrows a real one (both start empty, decode advances both, prefill only real rows), so padding changes
nothing in real rows and never runs past capacity. A prompt runs as successive chunks, largest first, and what no
chunk covers one token at a time (the batch-1 decode step); with power-of-two chunks that is one call per bit of
the prompt length, and no padding.

Forms the artifact may hold (manifest target "forms"):
  exported   prefill.pt2 / decode.pt2, the step as exported programs: compiled here with torch.compile, starting
             warm from the artifact's compile cache (inductor-cache.bin) when torch and the processor match the
             exporting machine's; otherwise a note, and a fresh compile
  aoti       one AOTInductor package per shape (CPU artifacts): loads in milliseconds, with no compiler

On CUDA each state's decode step is captured once as a CUDA graph over its fixed buffers (runtime/slots.py) and
replayed. Prefill replays graphs too, one per chunk length, captured over one row of state kept by the backend (the
prefill stage): a row's state is copied in, its chunks replay, the state is copied back. Called directly, a chunk
costs about the same whatever its length (H100, tiny: 5.4 ms at 128 tokens, 5.6 ms at 2048), the time to launch
its kernels from Python; the two copies of a row's state take microseconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from .engine import Engine
from .manifest import ArtifactError, Manifest
from .slots import SlotPool
from .torch_backend import share_weights, zeros_state

log = logging.getLogger("next_deploy.runtime")
FORMS = ("exported", "aoti")
ALIGNMENT = 16   # bytes; compiled CUDA code assumes inputs this aligned (a row of `lengths` is not)


# ---- shapes, shared with export/compiled.py ------------------------------------------------------


def default_decode_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... below max_batch, then max_batch."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch:
        buckets.append(buckets[-1] * 2)
    return sorted({*buckets, max_batch})


def default_prefill_chunks(max_seq_len: int, largest: int = 512) -> list[int]:
    """2, 4, 8, ... up to `largest` (or max_seq_len): any prompt length is then a sum of distinct chunks and 1."""
    chunks = [2]
    while chunks[-1] * 2 <= min(largest, max_seq_len):
        chunks.append(chunks[-1] * 2)
    return chunks


def compiled_shapes(buckets: list[int], chunks: list[int]) -> list[tuple[int, int]]:
    """(batch, tokens) of every compiled graph: decode per bucket, then one-row prefill per chunk."""
    return [(b, 1) for b in buckets] + [(1, c) for c in chunks]


def shape_name(batch: int, tokens: int) -> str:
    return f"decode-b{batch}" if tokens == 1 else f"prefill-t{tokens}"


def chunk_lengths(tokens: int, chunks: list[int]) -> list[int]:
    """Split a prompt into compiled chunk lengths, largest first; the rest runs a token at a time."""
    out = []
    for c in sorted(chunks, reverse=True):
        n, tokens = divmod(tokens, c)
        out += [c] * n
    return out + [1] * tokens


def fingerprint(device: str) -> dict:
    """What compiled code depends on besides the graph: the torch build and the processor it was compiled for."""
    import torch
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        target = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    else:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        target = f"CPU ({pick_vec_isa() or 'no vector extensions'})"
    return {"torch": torch.__version__, "target": target}


def missing_toolchain(device: str) -> str | None:
    """Why Inductor cannot compile for `device` on this machine, or None when it can."""
    if device == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler
        try:
            get_cpp_compiler()
        except Exception:
            return "Inductor's CPU backend needs a C++ compiler and none works here (install g++, or set CXX)"
        return None
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Inductor's CUDA backend needs Triton (pip install triton)"
    if not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")):
        return "Triton needs a C compiler for its kernel launchers and none was found (install gcc, or set CC)"
    return None


def pdl_support(device: str) -> str | None:
    """Why Inductor cannot emit programmatic dependent launch here, or None when it can."""
    import torch
    if device != "cuda" or not torch.cuda.is_available():
        return "programmatic dependent launch is a CUDA feature"
    if not hasattr(torch._inductor.config.triton, "enable_pdl"):
        return f"this torch's Inductor ({torch.__version__}) has no programmatic dependent launch (triton.enable_pdl)"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"programmatic dependent launch needs compute capability 9.0 or later; this GPU is {major}.{minor}"
    return None


def _launch_project_kernels_dependent() -> None:
    """Have Inductor launch the project's Triton kernels with programmatic dependent launch when it launches its own
    so (triton.enable_pdl). Inductor compiles user-defined Triton kernels with `launch_pdl` off and takes no option
    for it (torch 2.11 to 2.13: their `triton_meta` is built without it in the wrapper codegen's
    define_user_defined_triton_kernel), so the definition it writes into the compiled module is amended: only that
    of a kernel called with PDL=True, which waits for its predecessors before touching their outputs
    (model/kernels/triton_pdl.py). The amended code is what the compile cache records, so a runtime loading it
    launches the same way. Where the definition does not read as expected, the kernel launches the ordinary way."""
    from torch._inductor import config
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    define_kernel = PythonWrapperCodegen.define_kernel
    if getattr(define_kernel, "amends_pdl", False):
        return

    def define_kernel_dependent(self, kernel_name, kernel_body, *args, **kwargs):
        if (config.triton.enable_pdl and "user_autotune(" in kernel_body and "'PDL': True" in kernel_body
                and "launch_pdl" not in kernel_body):
            kernel_body = kernel_body.replace("triton_meta={", "triton_meta={'launch_pdl': True, ", 1)
        return define_kernel(self, kernel_name, kernel_body, *args, **kwargs)

    define_kernel_dependent.amends_pdl = True
    PythonWrapperCodegen.define_kernel = define_kernel_dependent


def compile_options(autotune: bool = False, pdl: bool = False) -> dict:
    """torch.compile's Inductor options. `autotune` (CUDA): Inductor times its own Triton matrix-product templates,
    which can take neighbouring pointwise work into the same kernel, against cuBLAS for every product and keeps the
    faster (max-autotune; its CUDA graphs stay off, the backend captures its own over fixed buffers). `pdl` (CUDA,
    Hopper on): Inductor's Triton kernels and the project's launch with programmatic dependent launch, each starting
    while the one before it finishes and waiting where it reads that one's output: a decode step is ~100 small
    kernels, busy for half its time (README, Performance).

    Inductor's padding of buffer strides stays off: it widened the rows of the DeltaNet layers' qkvz product, and
    the project's kernels are traced at the unpadded strides, so each layer copied the product back to them
    (H100, 2048-token prefill of an 8-layer `small`: 2.77 -> 2.72 ms without its 6 copies; outputs bit-identical)."""
    import torch
    options = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs")) if autotune else {}
    options["comprehensive_padding"] = False
    if pdl:
        problem = pdl_support("cuda")
        if problem:     # an artifact built where it worked, compiled afresh where it does not: still correct
            log.warning("note: compiling without programmatic dependent launch: %s", problem)
        else:
            options["triton.enable_pdl"] = True
            _launch_project_kernels_dependent()
    return options


def load_programs(directory: Path, files: dict) -> dict:
    """The prefill and decode programs of a compiled target, on one copy of the weights (share_weights)."""
    import torch
    return share_weights({role: torch.export.load(str(directory / files[role])) for role in ("prefill", "decode")})


def compile_step(program, specs, batch: int, tokens: int, device, stream=None, options: dict | None = None):
    """torch.compile one shape of an exported step with Inductor `options` (compile_options) and run it once on
    scratch buffers, so that compiling (or loading it from the cache) happens now. Export and runtime both compile
    through here: identical graphs and options are what make the runtime's cache lookups hit."""
    import torch
    module = program.module()
    for p in module.parameters():
        p.requires_grad_(False)
    step = torch.compile(module, dynamic=False, fullgraph=True, options=options or {})
    ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
        step(ids, *zeros_state(specs, batch, device))
    return step


# ---- the backend ---------------------------------------------------------------------------------


class _Slot:
    """One bucket's fixed buffers: the state (real rows first, padding after) and the decode input ids; on CUDA
    also the decode graph captured over them and its output (device ids in, device logits out: device sampling),
    and a second graph of the same step that also copies the ids in from and the logits out to pinned host
    buffers (the host-in, host-out Engine API); the two share a memory pool and never run at once."""

    def __init__(self, tensors, ids):
        self.tensors, self.ids = tensors, ids
        self.graph = self.logits = self.pool = None
        self.host_graph = self.host_ids = self.host_logits = None

    @property
    def bucket(self) -> int:
        return self.ids.shape[0]

    def buffers(self):
        return [*self.tensors, self.ids]


def _copy_each(destinations, sources) -> None:
    """destination.copy_(source) for each pair, as one foreach launch per dtype: a prefill stages its row's state
    in and out, two tensors a layer (`small`'s 2048-token prefill on an H100: 100 copy launches, 0.31 ms; as foreach
    copies, the bfloat16 ones 6 launches, 0.19 ms)."""
    import torch
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype   # torch's optimizers group so too
    for (group_destinations, group_sources), _ in _group_tensors_by_device_and_dtype([destinations, sources]).values():
        torch._foreach_copy_(group_destinations, group_sources)


class _PrefillStage:
    """One row of state at fixed addresses, and per chunk length (input ids buffer, graph captured over them, its
    logits). The graphs share one memory pool: they replay one at a time, on one stream."""

    def __init__(self, tensors, pool):
        self.tensors, self.pool = tensors, pool
        self.chunks: dict[int, tuple] = {}


class CompiledBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str, form: str = "auto",
                 cuda_graphs: bool = True):
        import torch
        import model.kernels.ops  # noqa: F401  (registers the nextdeploy:: ops the programs call)
        from model.device import torch_device

        target = manifest.targets.get("compiled")
        if target is None:
            raise ArtifactError(f"{directory} has no compiled target (built: {', '.join(manifest.targets)}); "
                                "re-export with --target compiled")
        if device != manifest.device:
            raise ArtifactError(f"{directory} was compiled for {manifest.device}; load it with "
                                f"device='{manifest.device}', or re-export with --device {device}")
        self.torch = torch
        self.device = torch_device(device)
        self.specs = manifest.state
        self.buckets, self.chunks = target["decode_buckets"], target["prefill_chunks"]
        self.graphs = cuda_graphs and device == "cuda"
        self.stream = torch.cuda.Stream() if device == "cuda" else None
        self.form = self._choose_form(directory, target, form)
        started = time.perf_counter()
        self.steps = self._load_aoti(directory, target) if self.form == "aoti" else self._compile(directory, target)
        self.load_seconds = time.perf_counter() - started
        self.slots = SlotPool(self._new_slot)
        self.staging: dict[int, object] = {}
        self.stage: _PrefillStage | None = None

    # ---- loading ---------------------------------------------------------------------------------

    def _choose_form(self, directory: Path, target: dict, form: str) -> str:
        built, here = target["compiled_with"], fingerprint(self.device.type)
        if form == "auto":
            form = "aoti" if "aoti" in target["forms"] and built == here else "exported"
        if form not in FORMS:
            raise ArtifactError(f"unknown form {form!r}; use 'auto' or one of {', '.join(FORMS)}")
        if form == "aoti":
            if "aoti" not in target["forms"]:
                raise ArtifactError(f"{directory} holds no AOTInductor packages (forms: "
                                    f"{', '.join(target['forms'])}); load it with form='exported'")
            if built != here:
                raise ArtifactError(f"{directory}'s AOTInductor packages were compiled with torch {built['torch']} "
                                    f"for {built['target']}, and this machine has torch {here['torch']} on "
                                    f"{here['target']}; load with form='exported' to compile afresh, or re-export here")
        else:
            problem = missing_toolchain(self.device.type)
            if problem:
                raise ArtifactError(f"cannot compile {directory} on this machine: {problem}")
        return form

    def _programs(self, directory: Path, target: dict, built: dict) -> dict:
        try:
            return load_programs(directory, target["files"])
        except Exception as e:
            raise ArtifactError(f"{directory} was exported with torch {built['torch']}, and this torch "
                                f"({self.torch.__version__}) cannot load its programs ({type(e).__name__}: {e}); "
                                "re-export with this torch") from e

    def _compile(self, directory: Path, target: dict) -> dict:
        torch = self.torch
        built, here = target["compiled_with"], fingerprint(self.device.type)
        shapes = compiled_shapes(self.buckets, self.chunks)
        cache = target["files"].get("inductor_cache")
        if cache and built == here:
            torch.compiler.load_cache_artifacts((directory / cache).read_bytes())
        elif cache:
            log.warning("note: %s was compiled with torch %s for %s, and this machine has torch %s on %s, so its "
                        "compile cache does not apply: compiling %d graphs afresh (minutes)", directory,
                        built["torch"], built["target"], here["torch"], here["target"], len(shapes))
        else:
            log.warning("note: %s holds no compile cache for this machine: compiling %d graphs with Inductor "
                        "(minutes)", directory, len(shapes))
        programs = self._programs(directory, target, built)
        options = compile_options(target.get("autotune", False), target.get("pdl", False))
        return {(b, t): compile_step(programs["decode" if t == 1 else "prefill"], self.specs, b, t, self.device,
                                     self.stream, options) for b, t in shapes}

    def _load_aoti(self, directory: Path, target: dict) -> dict:
        torch = self.torch
        # The packages hold code only; every one runs on the same weights, those of the exported program.
        program = self._programs(directory, target, target["compiled_with"])["decode"]
        # user_managed: the runners use these tensors without a copy of their own, so the backend keeps them.
        self.weights = weights = {**program.state_dict, **program.constants}
        steps = {}
        for b, t in compiled_shapes(self.buckets, self.chunks):
            runner = torch._inductor.aoti_load_package(str(directory / target["files"][f"aoti:{shape_name(b, t)}"]))
            runner.load_constants({k: weights[k] for k in runner.get_constant_fqns()}, check_full_update=True,
                                  user_managed=True)
            steps[(b, t)] = runner
        return steps

    # ---- states ----------------------------------------------------------------------------------

    def _new_slot(self, bucket: int) -> _Slot:
        torch = self.torch
        return _Slot(zeros_state(self.specs, bucket, self.device),
                     torch.zeros(bucket, 1, dtype=torch.long, device=self.device))

    def new_state(self, batch: int):
        bucket = next(b for b in self.buckets if b >= batch)   # the engine keeps batch <= max_batch, the last
        handle, reused = self.slots.take(bucket)
        if reused:
            for t in handle.slot.buffers():
                t.zero_()
        return handle

    def clone_state(self, handle):
        copy, _ = self.slots.take(handle.slot.bucket)
        for mine, theirs in zip(copy.slot.buffers(), handle.slot.buffers()):
            mine.copy_(theirs)
        return copy

    # ---- steps -----------------------------------------------------------------------------------

    def step(self, ids: np.ndarray, handle, rows: np.ndarray, batch: int) -> np.ndarray:
        if self.graphs and ids.shape[1] == 1 and len(rows) == batch:
            with self.torch.no_grad():      # (grad mode is part of what compiled code is specialised on)
                return self._decode_host(handle.slot, ids[:, 0], batch)
        return self.step_on_device(ids, handle, rows, batch).cpu().numpy()

    def _decode_host(self, slot: _Slot, ids: np.ndarray, batch: int) -> np.ndarray:
        """A decode step from host ids to host logits in one graph replay and one wait. Copied by torch ops
        around the replay, the ids in and the logits out took 20-30 and 28-37 us of host time each on an H100
        machine; inside the graph the whole step took 152 us against 174-187 (`tiny`, 4096 slots, 0.11 ms of
        GPU work)."""
        if slot.host_graph is None:
            self._capture_host(slot)
        slot.host_ids[:batch] = ids
        slot.host_graph.replay()
        if self.device.type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()
        return slot.host_logits[:batch].copy()   # the buffer is the next step's too

    def step_on_device(self, ids: np.ndarray, handle, rows: np.ndarray, batch: int):
        """Like step, but the logits stay on the device (float32 [len(rows), vocab]); a decode step's ids
        [batch, 1] may be on the device already (a sampled token)."""
        with self.torch.no_grad():
            if ids.shape[1] == 1 and len(rows) == batch:
                return self._decode(handle.slot, ids[:, 0], batch)
            return self.torch.cat([self._prefill(handle.slot, int(r), ids[i]) for i, r in enumerate(rows)])

    def _decode(self, slot: _Slot, ids, batch: int):
        """ids [batch]: host (NumPy) or already on the device (a sampled token)."""
        slot.ids[:batch, 0].copy_(ids if isinstance(ids, self.torch.Tensor) else self.torch.from_numpy(ids))
        if not self.graphs:
            return self.steps[(slot.bucket, 1)](slot.ids, *slot.tensors)[:batch]
        if slot.graph is None:
            self._capture(slot)
        slot.graph.replay()
        return slot.logits[:batch]

    def _capture(self, slot: _Slot) -> None:
        """Record the bucket's decode step over this slot's buffers. Each slot's graphs keep their own memory
        pool: graphs of different slots replay in any order."""
        slot.pool = slot.pool or self.torch.cuda.graph_pool_handle()
        slot.graph, slot.logits = self._record(self.steps[(slot.bucket, 1)], slot.ids, *slot.tensors,
                                               pool=slot.pool)

    def _capture_host(self, slot: _Slot) -> None:
        """Record the decode step between pinned host buffers: the ids' copy in and the logits' copy out are
        nodes of the graph. The buffers are allocated first (no allocation of pinned memory while capturing);
        the device graph gives the logits' shape."""
        torch = self.torch
        if slot.graph is None:
            self._capture(slot)
        pinned = self.device.type == "cuda"     # (not under the CPU tests' stand-in for graphs)
        host_ids = torch.zeros(slot.bucket, dtype=torch.long, pin_memory=pinned)
        host_logits = torch.empty(slot.logits.shape, dtype=slot.logits.dtype, pin_memory=pinned)
        step = self.steps[(slot.bucket, 1)]

        def step_between_host_buffers(ids, *tensors):
            ids[:, 0].copy_(host_ids, non_blocking=True)
            host_logits.copy_(step(ids, *tensors), non_blocking=True)
            return host_logits

        slot.host_graph, _ = self._record(step_between_host_buffers, slot.ids, *slot.tensors, pool=slot.pool)
        slot.host_ids, slot.host_logits = host_ids.numpy(), host_logits.numpy()

    def _record(self, step, *args, pool=None):
        """(CUDA graph of step(*args) on the backend's stream, its output). Capturing runs nothing; every step was
        warmed up on this stream when it was compiled, so no lazy initialisation happens inside the capture."""
        torch = self.torch
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, pool=pool, stream=self.stream):
            out = step(*args)
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph, out

    def _chunks(self, ids: np.ndarray):
        """(length, ids [1, length] on the host) of each compiled chunk a prompt runs as, in order."""
        start = 0
        for n in chunk_lengths(len(ids), self.chunks):
            # Made [n] then [1, n]: compiled code is specialised on strides, and NumPy's size-1 strides vary.
            yield n, self.torch.from_numpy(np.array(ids[start:start + n]))[None]
            start += n

    def _prefill(self, slot: _Slot, row: int, ids: np.ndarray):
        return self._prefill_graphs(slot, row, ids) if self.graphs else self._prefill_direct(slot, row, ids)

    def _prefill_graphs(self, slot: _Slot, row: int, ids: np.ndarray):
        torch = self.torch
        if self.stage is None:
            self.stage = _PrefillStage(zeros_state(self.specs, 1, self.device), torch.cuda.graph_pool_handle())
        stage = self.stage
        _copy_each(stage.tensors, [t[row:row + 1] for t in slot.tensors])
        for n, chunk in self._chunks(ids):
            if n not in stage.chunks:
                buffer = torch.zeros(1, n, dtype=torch.long, device=self.device)
                stage.chunks[n] = (buffer, *self._record(self.steps[(1, n)], buffer, *stage.tensors,
                                                         pool=stage.pool))
            buffer, graph, logits = stage.chunks[n]
            buffer.copy_(chunk)
            graph.replay()
        _copy_each([t[row:row + 1] for t in slot.tensors], stage.tensors)
        return logits.clone()    # the graph's output buffer: the next row's replay overwrites it

    def _prefill_direct(self, slot: _Slot, row: int, ids: np.ndarray):
        torch = self.torch
        views, staged = [], []
        for i, t in enumerate(slot.tensors):
            view = t[row:row + 1]
            if view.data_ptr() % ALIGNMENT:
                # Compiled code would copy a misaligned input and (in some torch versions) drop its update.
                stage = self.staging.get(i)
                if stage is None:
                    stage = self.staging[i] = torch.empty_like(view)
                stage.copy_(view)
                staged.append((view, stage))
                view = stage
            views.append(view)
        for n, chunk in self._chunks(ids):
            logits = self.steps[(1, n)](chunk.to(self.device), *views)
        for view, stage in staged:
            view.copy_(stage)
        return logits


class CompiledEngine(Engine):
    """The engine API over the compiled backend. generate() samples on the device (runtime/device_sampling.py), so
    only token ids leave it, and runs ahead: each sampled token feeds the next decode step on the device, and that
    step is queued before the token is read on the host, so the host's share of a step (reading the token, Python,
    launching the graphs) overlaps the device's work instead of adding to it."""

    def _stream_ids(self, sampling):
        from .device_sampling import DeviceSampler, TokenReader
        sampler = DeviceSampler(sampling, self.backend.device, graphs=self.backend.graphs)

        def stream(prompt_ids: list[int], budget: int, stop_ids: set[int]):
            if not prompt_ids:
                raise ValueError("the prompt encodes to no tokens; give a non-empty prompt")
            return self._run_ahead(self.new_state(1), prompt_ids, budget, sampler, TokenReader(self.backend.device),
                                   stop_ids)
        return stream

    def _run_ahead(self, state, prompt_ids, budget, sampler, reader, stop_ids):
        """model.generate.generate_ids's loop, the same sampler calls in the same order (so seeded runs give the
        same tokens), with step n + 1 queued before token n is read. A stop token leaves one step run past it, in
        a state nobody sees again."""
        history = list(prompt_ids)
        logits = self._next_logits(history, state)
        for n in range(budget):
            token = sampler(logits[None], [history])
            reader.queue(token)
            if n + 1 < budget:
                logits = self._decode_on_device(token, state)
            token = reader.read()
            if token in stop_ids:
                return
            history.append(token)
            yield token

    def _next_logits(self, ids, state):
        return self._advance(self._check_ids(np.asarray(ids))[None], state)

    def _decode_on_device(self, token, state):
        """One decode step on a token that is already on the device ([1], a sampler's output): no host copy."""
        return self._advance(token.view(1, 1), state)

    def _advance(self, ids, state):
        """ids [1, T] (host, or on the device for a decode step) through the one-row state: its logits, on the
        device."""
        self._check_room(state, [ids.shape[1]])
        logits = self.backend.step_on_device(ids, state.tensors, np.zeros(1, dtype=np.int64), 1)
        state.lengths += ids.shape[1]
        return logits[0]
