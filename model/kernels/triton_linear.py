"""A linear layer at a few rows (a decode step's projections) with its neighbouring pointwise work, in one launch
(reference: reference.fused_linear).

At batch 1 a decode step is a chain of matrix-vector products, each reading its weight once, and under a CUDA
graph every launch costs about as much as a small product's bytes. cuBLAS takes a product alone, so the RMSNorm
before it (with the residual add that Inductor joins to the norm) and the SwiGLU before the MLP's down projection
each cost a launch of their own. Here the prologue (the norm's statistics are a reduction over the row, cheap to
recompute in every program; SwiGLU is pointwise) and the epilogue (bias, residual) run in the same programs.

One program per (block of up to 8 rows, block of BLOCK_N output columns), over K in unrolled blocks: each weight
block is read once for the rows of a decode step. Products are accumulated in float32, and each step is rounded to the
input dtype where the separate torch ops would round, so a 16-bit result matches theirs to rounding; logits can be
returned in float32 without that last rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import linear_blocks
from .triton_pdl import after_last_loads, after_predecessors, waits

# The prologue, a compile-time choice.
PLAIN = tl.constexpr(0)
NORM = tl.constexpr(1)
SWIGLU = tl.constexpr(2)


@triton.jit
def fused_linear_kernel(
    x, up, weight, bias, norm_weight, residual, out,
    M, N, eps,
    stride_xm, stride_um, stride_wn, stride_rm, stride_om,
    K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = weight + cols[:, None] * stride_wn
    # The first weight block before the wait: no kernel of a step writes weights, so a dependent launch (PDL) has
    # its first loads under way while the kernel before it finishes. The rows' addresses come after the wait.
    w_first = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0)
    rows = (after_predecessors(tl.program_id(0), PDL) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    m_ok = rows < M
    x_rows = x + rows[:, None] * stride_xm
    if PROLOGUE == NORM:   # each row's mean square first (the rows are small and stay in cache for the loop)
        squares = tl.zeros([ROWS, BLOCK_K], tl.float32)
        for k0 in tl.static_range(0, K, BLOCK_K):
            xk = tl.load(x_rows + (k0 + ks)[None, :], mask=m_ok[:, None] & (k0 + ks < K)[None, :],
                         other=0.0).to(tl.float32)
            squares += xk * xk
        # As float32: a Python float argument reaches Inductor-compiled graphs as float64.
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps).to(tl.float32)
    # Products summed over K at the end, not per block: one cross-thread reduction instead of one per block. The
    # loop is unrolled (K is a constant) so that the weight loads need not wait on each block's products: on an
    # H100, `small`'s 97 batch-1 decode products chained in one CUDA graph took 700 against 755 us with the loop
    # (outputs bit-identical), and a plain product without prologue or epilogue 552 against 781 us.
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        x_ok = m_ok[:, None] & k_ok[None, :]
        xk = tl.load(x_rows + (k0 + ks)[None, :], mask=x_ok, other=0.0)
        if PROLOGUE == NORM:
            w_norm = tl.load(norm_weight + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            xk = (xk.to(tl.float32) * rstd[:, None] * (1.0 + w_norm[None, :])).to(xk.dtype)
        elif PROLOGUE == SWIGLU:   # x is the gate
            gate = xk.to(tl.float32)
            uk = tl.load(up + rows[:, None] * stride_um + (k0 + ks)[None, :], mask=x_ok, other=0.0)
            xk = ((gate * tl.sigmoid(gate)).to(xk.dtype).to(tl.float32) * uk.to(tl.float32)).to(xk.dtype)
        if k0 == 0:
            w = w_first
        else:
            w = tl.load(w_rows + (k0 + ks)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32)[None, :, :] * xk.to(tl.float32)[:, None, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(bias + cols, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        y = y.to(x.dtype.element_ty).to(tl.float32) + \
            tl.load(residual + rows[:, None] * stride_rm + cols[None, :], mask=y_ok, other=0.0).to(tl.float32)
    y = after_last_loads(y, PDL)   # y comes from every load of the program
    tl.store(out + rows[:, None] * stride_om + cols[None, :], y.to(out.dtype.element_ty), mask=y_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] as [rows, C] with a unit last stride (a view where the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def fused_linear(x, weight, bias=None, norm_weight=None, up=None, residual=None, eps: float = 1e-6,
                 float_output: bool = False, launch=None):
    """See reference.fused_linear for the contract. Returns [..., N] in x's dtype, or with `float_output` in
    float32 (x's dtype where wider), the accumulator unrounded."""
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = _rows(x)
    rows = x2.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32) if float_output else x.dtype
    out = torch.empty(rows, N, dtype=dtype, device=x.device)
    up2 = _rows(up) if up is not None else x2
    res2 = _rows(residual) if residual is not None else out
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    # A plain int: Inductor's launcher of user kernels takes constexpr arguments as Python scalars.
    prologue = (NORM if norm_weight is not None else SWIGLU if up is not None else PLAIN).value
    block_rows, block_n, block_k, warps = linear_blocks(N, K, rows)
    kernel = launch(fused_linear_kernel) if launch else fused_linear_kernel
    kernel[(triton.cdiv(rows, block_rows), triton.cdiv(N, block_n))](
        x2, up2, weight, bias if bias is not None else out, norm_weight if norm_weight is not None else out, res2,
        out, rows, N, eps, x2.stride(0), up2.stride(0), weight.stride(0), res2.stride(0), out.stride(0),
        K=K, PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ROWS=block_rows, BLOCK_N=block_n, BLOCK_K=block_k, PDL=waits(x.device), num_warps=warps)
    return out.view(*lead, N)
