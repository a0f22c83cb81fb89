"""Programmatic dependent launch (PDL, compute capability 9.0 on) for the project's kernels.

A kernel launched dependent is set up while the kernel before it in the stream still runs, so the gap between the
two closes, and it can load what no kernel of a step writes (weights) before that kernel has finished. Launched so
only where runtime/compiled_backend.compile_options asks for it (`--pdl`), as Inductor launches its own kernels.
Each of the project's kernels takes a PDL constexpr; with it:
  - it waits for its predecessors to finish (griddepcontrol.wait, a no-op when it was launched the ordinary way)
    before it loads or stores anything another kernel may write or read (after_predecessors);
  - its own dependents may launch once it has loaded all it reads (after_last_loads; the fused linear kernel), or
    when it exits (the others): a dependent that does not wait, as Inductor's kernels do not where they read
    nothing of the kernel before them, then cannot overwrite what this kernel still reads.
On an H100 (a 12-layer `small` decode step at batch 1 in one CUDA graph, bf16, back-to-back replays) that took 521
us without PDL, 475 us with every kernel letting its dependents launch right after its wait, and 467 us so.

Both points are values passing through the instruction: the program id, from which every address of another
kernel's data is computed, so that nothing is loaded or stored before the wait returns; the result computed from
every load, so that dependents launch after them. torch analyses a user kernel's Triton IR for the tensors it
writes and gives up on inline assembly with side effects (Triton's gdc_wait), which then counts every input as
written; as pure functions of their input, these pass that analysis (torch 2.11 to 2.13) and stay in the kernel
because their results are used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def waits(device: torch.device) -> bool:
    """The PDL constexpr for kernels on `device`: the wait is an sm_90 instruction."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def after_predecessors(program_id, PDL: tl.constexpr):
    """`program_id`, returned once the kernels before this one have finished (with PDL)."""
    if PDL:
        # One line: Inductor (torch 2.11) copies a kernel's source into a string literal of its generated module
        # without escaping backslashes, so a newline escape here broke that module (SyntaxError on the H100).
        program_id = tl.inline_asm_elementwise("griddepcontrol.wait; mov.u32 $0, $1;", "=r,r", [program_id],
                                               dtype=tl.int32, is_pure=True, pack=1)
    return program_id


@triton.jit
def after_last_loads(result, PDL: tl.constexpr):
    """`result` (float32, computed from every load of the kernel), after letting the dependents launch (with PDL)."""
    if PDL:
        result = tl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.b32 $0, $1;", "=f,f", [result],
                                           dtype=tl.float32, is_pure=True, pack=1)
    return result
