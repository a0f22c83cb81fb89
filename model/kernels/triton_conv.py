"""Causal depthwise conv1d + SiLU with state in and out, as one Triton kernel (reference: reference.causal_conv1d).

Each program computes a [BLOCK_T, BLOCK_C] tile of the output. Inputs before the tile's first step come from x
itself or, before x starts, from the incoming state; the program that owns the first time tile of a channel
block also writes that block's outgoing state (the last W-1 inputs), to a separate tensor or in place: no program
ever reads a value another one has overwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def causal_conv1d_kernel(
    x, weight, state, y, new_state,
    T, C,
    stride_xb, stride_xt, stride_sb, stride_yb, stride_yt,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t_block = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    steps = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    x_row = x + b * stride_xb
    s_row = state + b * stride_sb

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        src = steps - (W - 1) + j                       # input step feeding tap j; < 0 lies in the state
        from_x = (src >= 0) & (src < T)
        from_state = src < 0
        xv = tl.load(x_row + src[:, None] * stride_xt + channels[None, :],
                     mask=from_x[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        sv = tl.load(s_row + channels[None, :] * (W - 1) + (src[:, None] + (W - 1)),
                     mask=from_state[:, None] & c_ok[None, :] & (steps[:, None] < T), other=0.0).to(tl.float32)
        w = tl.load(weight + channels * W + j, mask=c_ok, other=0.0).to(tl.float32)
        acc += (xv + sv) * w[None, :]
    out = acc * tl.sigmoid(acc)
    tl.store(y + b * stride_yb + steps[:, None] * stride_yt + channels[None, :], out.to(y.dtype.element_ty),
             mask=(steps[:, None] < T) & c_ok[None, :])

    if t_block == 0:
        # The outgoing state: inputs T-(W-1) .. T-1 of the sequence [state, x]. After every thread's reads of the
        # incoming state, so new_state may be the state's own buffer (TensorRT binds past and present state to one
        # buffer); only this tile reads the incoming state (BLOCK_T >= W-1), and tap j reads tap j+T >= j.
        tl.debug_barrier()
        for j in tl.static_range(W - 1):
            step = T - (W - 1) + j
            tail_x = tl.load(x_row + step * stride_xt + channels, mask=c_ok & (step >= 0), other=0.0)
            tail_s = tl.load(s_row + channels * (W - 1) + (step + (W - 1)), mask=c_ok & (step < 0), other=0.0)
            kept = tl.where(step >= 0, tail_x.to(new_state.dtype.element_ty), tail_s.to(new_state.dtype.element_ty))
            tl.store(new_state + b * stride_sb + channels * (W - 1) + j, kept, mask=c_ok)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, launch=None):
    """x: [B,T,C] (channels contiguous); weight: [C,W]; state: [B,C,W-1] contiguous.
    Returns (silu(conv) [B,T,C] in x's dtype, new state [B,C,W-1] in state's dtype).
    `launch` wraps the kernel for the caller (torch.library.wrap_triton inside a triton_op)."""
    B, T, C = x.shape
    W = weight.shape[-1]
    if x.stride(2) != 1:
        x = x.contiguous()
    weight, state = weight.contiguous(), state.contiguous()
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    new_state = torch.empty_like(state)
    block_t = min(64, triton.next_power_of_2(max(T, 1)))
    block_c = 128 if T > 1 else 256
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    kernel = launch(causal_conv1d_kernel) if launch else causal_conv1d_kernel
    kernel[grid](x, weight, state, y, new_state, T, C,
                 x.stride(0), x.stride(1), state.stride(0), y.stride(0), y.stride(1),
                 W=W, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return y, new_state
