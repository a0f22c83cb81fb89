"""The chunked gated delta rule's serial scan for training, forward and backward (reference: reference.chunk_scan
and reference.chunk_scan_backward; ops.chunk_scan holds the autograd formula around them).

Everything of the chunked rule but the walk over the chunks is a batch of products over all chunks at once, which
Inductor and cuBLAS run well. The walk, traced as PyTorch, was the bulk of a compiled training step: on an H100
(`small`'s heads, bf16, batch 8 x 2048) the reference rule's forward and backward took 12.8 ms a layer at chunks of
128 and 25.2 ms at 64, twice as much for twice the chunks, since every chunk's slice of the stacked terms has a
backward the size of the whole tensor. Here each direction is one kernel, one program per (batch row, value head,
block of value columns) with the [K, BV] state (or its gradient) in registers:
1. forward: prefill's chunk_scan_kernel (triton_chunk.py), also keeping each chunk's U and start state S_i;
2. backward, `chunk_scan_backward_kernel`, the chunks in reverse order: with G the gradient at a chunk's end
   state, dU = dy_U + E G, then G <- decay G - [K_c; Q_s]^T [dU; dy_O] (one 128-row product, as the forward's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CHUNK, chunk_operands, dot_block, training_scan_launch
from .triton_chunk import _operand, chunk_scan_kernel
from .triton_pdl import after_predecessors, waits


@triton.jit
def chunk_scan_backward_kernel(
    dy, w, decay, d_final, d_u_v, d_ends, d_state,
    T, Hv,
    stride_yb, stride_yh, stride_yt, stride_wb, stride_wh, stride_wt, stride_db, stride_dh,
    stride_ub, stride_uh, stride_ut, stride_sb, stride_sh, stride_eb, stride_eh,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, FREE: tl.constexpr,
    PDL: tl.constexpr,
):
    """dy, d_u_v [B, Hv, T, 2V] as [U | O] per step; w [B, Hv, T, 3K] as [K_c | Q_s | E]; T whole chunks."""
    bh = after_predecessors(tl.program_id(0), PDL)
    b = (bh // Hv).to(tl.int64)
    h = bh % Hv
    kc = tl.arange(0, BK)
    vc = tl.program_id(1) * BV + tl.arange(0, BV)
    y_ptr = dy + b * stride_yb + h * stride_yh
    w_ptr = w + b * stride_wb + h * stride_wh
    u_ptr = d_u_v + b * stride_ub + h * stride_uh
    d_ptr = decay + b * stride_db + h * stride_dh
    e_ptr = d_ends + b * stride_eb + h * stride_eh
    s_offsets = kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    G = tl.load(d_final + b * stride_sb + h * stride_sh + s_offsets, mask=s_mask, other=0.0)

    # Rows 0-63 of the stacked operands are a chunk's U rows, 64-127 its outputs' (as in the forward).
    stacked = tl.arange(0, 128)
    step = stacked % 64
    half = stacked // 64
    k_cols = (kc < K)[None, :]
    v_cols = (vc < V)[None, :]
    chunks = T // 64
    for j in range(0, chunks):
        i = chunks - 1 - j
        rows = i * 64 + step
        w_rows = w_ptr + rows[:, None] * stride_wt
        tl.store(e_ptr + i * K * V + s_offsets, G, mask=s_mask)
        # E against the U rows only: zero where the stacked rows hold the outputs.
        k_end = tl.load(w_rows + 2 * K + kc[None, :], mask=(half == 0)[:, None] & k_cols, other=0.0)
        R = tl.load(y_ptr + rows[:, None] * stride_yt + half[:, None] * V + vc[None, :], mask=v_cols,
                    other=0.0).to(tl.float32)
        R += tl.dot(_operand(k_end, FREE), _operand(G, FREE), input_precision=PREC)
        tl.store(u_ptr + rows[:, None] * stride_ut + half[:, None] * V + vc[None, :], R.to(d_u_v.dtype.element_ty),
                 mask=v_cols)
        l_terms = tl.load(w_rows + half[:, None] * K + kc[None, :], mask=k_cols, other=0.0)
        G = tl.load(d_ptr + i) * G - tl.dot(_operand(tl.trans(l_terms), FREE), _operand(R, FREE),
                                            input_precision=PREC)
    tl.store(d_state + b * stride_sb + h * stride_sh + s_offsets, G, mask=s_mask)


def _launch(writes, terms):
    """Blocks, precisions, warps and stages of both kernels (launch.training_scan_launch) for writes' dtype."""
    K, V = terms.shape[-1] // 3, writes.shape[-1] // 2
    dtype = str(writes.dtype).removeprefix("torch.")
    scan = training_scan_launch(K, V, dtype, str(terms.dtype).removeprefix("torch."),
                                writes.shape[0] * writes.shape[1])
    return dict(K=K, V=V, BK=dot_block(K), FREE=chunk_operands(dtype, K, V)["FREE"], PDL=waits(writes.device),
                **scan)


def chunk_scan(writes, terms, decay, state, launch=None):
    """reference.chunk_scan's contract at chunks of CHUNK steps (writes and terms contiguous, state float32)."""
    B, H, N, _ = writes.shape
    options = _launch(writes, terms)
    V = options["V"]
    y = torch.empty_like(writes)
    states = torch.empty(B, H, N // CHUNK, *state.shape[2:], dtype=torch.float32, device=state.device)
    final = torch.empty_like(state)
    (launch or (lambda kernel: kernel))(chunk_scan_kernel)[(B * H, triton.cdiv(V, options["BV"]))](
        writes, terms, decay, y, state, final, states, N, H,
        writes.stride(0), writes.stride(1), writes.stride(2), terms.stride(0), terms.stride(1), terms.stride(2),
        decay.stride(0), decay.stride(1), y.stride(0), y.stride(2), y.stride(1), V, state.stride(0), state.stride(1),
        states.stride(0), states.stride(1), KEEP=True, **options)
    return y, states, final


def chunk_scan_backward(dy, terms, decay, d_final, launch=None):
    """reference.chunk_scan_backward's contract at chunks of CHUNK steps (dy and terms contiguous)."""
    B, H, N, _ = dy.shape
    options = _launch(dy, terms)
    d_writes = torch.empty_like(dy)
    d_ends = torch.empty(B, H, N // CHUNK, *d_final.shape[2:], dtype=torch.float32, device=dy.device)
    d_state = torch.empty_like(d_final)
    (launch or (lambda kernel: kernel))(chunk_scan_backward_kernel)[(B * H, triton.cdiv(options["V"],
                                                                                        options["BV"]))](
        dy, terms, decay, d_final, d_writes, d_ends, d_state, N, H,
        dy.stride(0), dy.stride(1), dy.stride(2), terms.stride(0), terms.stride(1), terms.stride(2),
        decay.stride(0), decay.stride(1), d_writes.stride(0), d_writes.stride(1), d_writes.stride(2),
        d_final.stride(0), d_final.stride(1), d_ends.stride(0), d_ends.stride(1), **options)
    return d_writes, d_ends, d_state
