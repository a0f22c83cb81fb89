"""Causal depthwise conv1d + SiLU with state in and out, as one Triton kernel (reference: reference.causal_conv1d).

Each program computes a [BLOCK_T, BLOCK_C] tile of the output. Inputs before the tile's first step come from x
itself or, before x starts, from the incoming state; the program that owns the first time tile of a channel
block also writes that block's outgoing state (the last W-1 inputs), to a separate tensor or in place: no program
ever reads a value another one has overwritten.

The conv's channels are [all q | all k | all v] of a Gated DeltaNet layer, whose raw projection qkvz groups its
columns by key head ([q | k | v-group | z-group] each). `causal_conv1d_grouped` reads them from qkvz in place:
building the concatenation first was a copy of its own in every layer (`small`'s 2048-token prefill on an H100:
18 calls, 0.42 of 8.3 ms busy). Copy and conv together took 66.5 us a layer there, the conv from qkvz 39.1 (28.9
with the tiles and the first-tile-only state loads below).

Training (from no state) takes causal_conv1d forward and causal_conv1d_backward for the gradients: compiled, the
reference's shifted products and their autograd were five fused passes over float32 copies of the conv's input,
1.9 ms of a 13.5 ms `small` DeltaNet layer's training step on an H100 (8 x 2048 tokens, bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import after_predecessors, waits


@triton.jit
def _source_columns(channels, C, HK: tl.constexpr, KD: tl.constexpr):
    """x's columns of these conv channels. HK = 0: x is the conv's input itself. Else x is a qkvz projection of HK
    key heads of KD columns: channel c of [all q | all k | all v] is column i of key head h's q, k or v group."""
    if HK == 0:
        columns = channels
    else:
        GV = (C - 2 * HK * KD) // HK                # v columns of one key head
        head_cols = 2 * KD + 2 * GV                 # one key head's [q | k | v-group | z-group]
        c_k = channels - HK * KD
        c_v = channels - 2 * HK * KD
        columns = tl.where(c_k < 0, (channels // KD) * head_cols + channels % KD,
                           tl.where(c_v < 0, (c_k // KD) * head_cols + KD + c_k % KD,
                                    (c_v // GV) * head_cols + 2 * KD + c_v % GV))
    return columns


@triton.jit
def causal_conv1d_kernel(
    x, weight, state, y, new_state,
    T, C,
    stride_xb, stride_xt, stride_sb, stride_yb, stride_yt,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HK: tl.constexpr, KD: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_C: tl.constexpr, PDL: tl.constexpr,
):
    b = after_predecessors(tl.program_id(0), PDL).to(tl.int64)
    t_block = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_C
    channels = first + tl.arange(0, BLOCK_C)
    c_ok = (channels < C) | EVEN_C
    if ALIGNED:
        # The block lies inside one key head's q, k or v columns, so its columns are contiguous, and they start at
        # a multiple of the block; written as one offset plus a range, Triton vectorises their loads. Column by
        # column, Qwen3-Next's 2048-token conv took 3x as long as the copy and conv it replaces (H100, bf16).
        columns = tl.multiple_of(_source_columns(first, C, HK, KD), BLOCK_C) + tl.arange(0, BLOCK_C)
    else:
        columns = _source_columns(channels, C, HK, KD)
    steps = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    x_row = x + b * stride_xb
    s_row = state + b * stride_sb

    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if t_block * BLOCK_T >= W - 1:
        # Every input of this tile lies in x. Without the state's masked loads, `small`'s 2048-token conv took
        # 28.9 against 39.4 us (H100, bf16, with the launch below; identical outputs).
        for j in tl.static_range(W):
            src = steps - (W - 1) + j
            xv = tl.load(x_row + src[:, None] * stride_xt + columns[None, :],
                         mask=(src < T)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            w = tl.load(weight + channels * W + j, mask=c_ok, other=0.0).to(tl.float32)
            acc += xv * w[None, :]
    else:
        for j in tl.static_range(W):
            src = steps - (W - 1) + j                   # input step feeding tap j; < 0 lies in the state
            from_x = (src >= 0) & (src < T)
            from_state = src < 0
            xv = tl.load(x_row + src[:, None] * stride_xt + columns[None, :],
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
            tail_x = tl.load(x_row + step * stride_xt + columns, mask=c_ok & (step >= 0), other=0.0)
            tail_s = tl.load(s_row + channels * (W - 1) + (step + (W - 1)), mask=c_ok & (step < 0), other=0.0)
            kept = tl.where(step >= 0, tail_x.to(new_state.dtype.element_ty), tail_s.to(new_state.dtype.element_ty))
            tl.store(new_state + b * stride_sb + channels * (W - 1) + j, kept, mask=c_ok)


@triton.jit
def _input_at(x_row, stride_xt, src, channels, c_ok, T):
    """x at steps `src` of these channels, float32 [steps, channels]; zero outside 0..T-1 (no state: training)."""
    return tl.load(x_row + src[:, None] * stride_xt + channels[None, :],
                   mask=((src >= 0) & (src < T))[:, None] & c_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_before_silu(x_row, stride_xt, steps, channels, c_ok, weight, T, W: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """The conv at `steps` before its SiLU, float32 [BLOCK_T, BLOCK_C], from no state."""
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(W):
        xv = _input_at(x_row, stride_xt, steps - (W - 1) + j, channels, c_ok, T)
        acc += xv * tl.load(weight + channels * W + j, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_silu_grad_kernel(
    x, weight, dy, dp, dweight_parts,
    T, C, stride_xb, stride_xt, stride_b, stride_t,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    """First pass of silu(conv(x))'s gradients from no state, over a [BLOCK_T, BLOCK_C] tile: with p the conv before
    SiLU, dp = dy * silu'(p) (stored for the second pass), and the tile's share of the weight's gradient,
    dw_j = sum_t dp_t x_{t-(W-1)+j} (summed over the tiles outside). dy and dp share strides; x has its own."""
    b = after_predecessors(tl.program_id(0), PDL).to(tl.int64)
    t_block = tl.program_id(1)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    steps = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    x_row = x + b * stride_xb
    p = _conv_before_silu(x_row, stride_xt, steps, channels, c_ok, weight, T, W, BLOCK_T, BLOCK_C)
    at = b * stride_b + steps[:, None] * stride_t + channels[None, :]
    ok = (steps < T)[:, None] & c_ok[None, :]
    s = tl.sigmoid(p)
    d_p = tl.load(dy + at, mask=ok, other=0.0).to(tl.float32) * s * (1.0 + p * (1.0 - s))
    tl.store(dp + at, d_p.to(dp.dtype.element_ty), mask=ok)
    part = dweight_parts + (b * tl.num_programs(1) + t_block) * C * W + channels * W
    for j in tl.static_range(W):
        xv = _input_at(x_row, stride_xt, steps - (W - 1) + j, channels, c_ok, T)
        tl.store(part + j, tl.sum(d_p * xv, axis=0), mask=c_ok)


@triton.jit
def conv_input_grad_kernel(
    dp, weight, dx,
    T, C, stride_b, stride_t,
    W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    """Second pass: dx_t = sum_d w_{W-1-d} dp_{t+d} over a [BLOCK_T, BLOCK_C] tile."""
    b = after_predecessors(tl.program_id(0), PDL).to(tl.int64)
    channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = channels < C
    steps = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = b * stride_b
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for d in tl.static_range(W):
        later = steps + d
        g = tl.load(dp + row + later[:, None] * stride_t + channels[None, :],
                    mask=(later < T)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += g * tl.load(weight + channels * W + (W - 1 - d), mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(dx + row + steps[:, None] * stride_t + channels[None, :], acc.to(dx.dtype.element_ty),
             mask=(steps < T)[:, None] & c_ok[None, :])


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, launch=None):
    """x: [B,T,C] (channels contiguous); weight: [C,W]; state: [B,C,W-1] contiguous.
    Returns (silu(conv) [B,T,C] in x's dtype, new state [B,C,W-1] in state's dtype).
    `launch` wraps the kernel for the caller (torch.library.wrap_triton inside a triton_op)."""
    return _conv(x, weight, state, launch)


def causal_conv1d_grouped(qkvz: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, num_k_heads: int,
                          head_k_dim: int, launch=None):
    """causal_conv1d over the q, k and v columns of a Gated DeltaNet projection qkvz [B,T,*] (grouped by key head:
    reference.split_projections), read in place; weight [C,W] and state [B,C,W-1] in the conv's channel order."""
    return _conv(qkvz, weight, state, launch, num_k_heads, head_k_dim)


def _conv(x, weight, state, launch, num_k_heads: int = 0, head_k_dim: int = 0):
    B, T = x.shape[:2]
    C, W = weight.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    weight, state = weight.contiguous(), state.contiguous()
    y = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    new_state = torch.empty_like(state)
    # Small tiles of two warps: more programs in flight per SM. On an H100 (bf16) 16 x 64 took `small`'s conv at
    # T = 2048 / 8192 from 39.4 / 156 us (64 x 128, four warps) to 28.9 / 105, Qwen3-Next's from 84 / 300 to 56 / 206.
    block_t = min(16, triton.next_power_of_2(max(T, 1)))
    block_c, warps = (64, 2) if T > 1 else (256, 4)
    aligned = False
    if num_k_heads:
        segment = _segment_block(block_c, head_k_dim, (C - 2 * num_k_heads * head_k_dim) // num_k_heads)
        aligned, block_c = segment > 0, segment or block_c
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(C, block_c))
    kernel = launch(causal_conv1d_kernel) if launch else causal_conv1d_kernel
    kernel[grid](x, weight, state, y, new_state, T, C,
                 x.stride(0), x.stride(1), state.stride(0), y.stride(0), y.stride(1),
                 W=W, BLOCK_T=block_t, BLOCK_C=block_c, HK=num_k_heads, KD=head_k_dim, ALIGNED=aligned,
                 EVEN_C=C % block_c == 0, PDL=waits(x.device), num_warps=warps)
    return y, new_state


def _segment_block(largest: int, *segments: int) -> int:
    """The largest power of two up to `largest`, and at least 16, that divides every segment length; else 0."""
    block = largest
    while block >= 16:
        if all(n % block == 0 for n in segments):
            return block
        block //= 2
    return 0


def causal_conv1d_backward(x: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor, launch=None):
    """The gradients of causal_conv1d's output from no state (training): x [B,T,C] (channels contiguous; rows may
    be a wider tensor's, as training's projection gives them), weight [C,W], dy [B,T,C] (the output's gradient).
    Returns (dx [B,T,C] contiguous, in x's dtype; dweight [C,W] in float32).

    Two streaming passes: dp = dy * silu'(p) with the weight's gradient, then dx from dp. One kernel recomputing dp
    over the W-1 steps after each tile loaded 4W shifted tiles per tile: at `small`'s training shape on an H100
    (8 x 2048, 4096 channels, bf16) it took 607 us, the two passes 441 with a float32 dp and 370 with a bfloat16 one.
    dp is bfloat16 for bfloat16 inputs (the rounding bf16 autograd gives the SiLU's gradient too; dx 2.7e-3 from the
    float32 dp's) and float32 otherwise (float16's range could overflow it)."""
    B, T, C = x.shape
    W = weight.shape[-1]
    if x.stride(2) != 1:
        x = x.contiguous()
    weight, dy = weight.contiguous(), dy.contiguous()
    dx = torch.empty(B, T, C, dtype=x.dtype, device=x.device)
    dp = torch.empty_like(dx, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
    # Tiles of 64 x 64 and 32 x 64, two warps each: the fastest of 16-64 x 32-128 tiles at 1-4 warps in that run.
    block_t = min(64, triton.next_power_of_2(max(T, 1)))
    t_blocks = triton.cdiv(T, block_t)
    # One float32 [C, W] share per tile, summed below: a fixed order, so gradients repeat exactly run to run.
    parts = torch.empty(B * t_blocks, C, W, dtype=torch.float32, device=x.device)
    first = launch(conv_silu_grad_kernel) if launch else conv_silu_grad_kernel
    first[(B, t_blocks, triton.cdiv(C, 64))](x, weight, dy, dp, parts, T, C, x.stride(0), x.stride(1), dx.stride(0),
                                             dx.stride(1), W=W, BLOCK_T=block_t, BLOCK_C=64, PDL=waits(x.device),
                                             num_warps=2)
    block_t = min(32, block_t)
    second = launch(conv_input_grad_kernel) if launch else conv_input_grad_kernel
    second[(B, triton.cdiv(T, block_t), triton.cdiv(C, 64))](dp, weight, dx, T, C, dx.stride(0), dx.stride(1),
                                                             W=W, BLOCK_T=block_t, BLOCK_C=64, PDL=waits(x.device),
                                                             num_warps=2)
    return dx, parts.sum(0)
