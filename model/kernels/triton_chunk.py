"""Chunked gated delta rule for prefill, in two Triton kernels (reference: reference.gated_delta_rule_chunked).

Per value head the sequence is cut into chunks of 64 steps. With c the cumulative log-decay inside a chunk and
S0 the state at its start, the chunk's writes U solve the unit-lower-triangular system

    (I + A) U = diag(beta) V - diag(beta * exp(c)) K S0,    A_ij = beta_i exp(c_i - c_j) k_i.k_j   (j < i)

and its outputs and next state are  O = exp(c) Q S0 + (Q K^T * decay) U,  S = exp(c_last) S0 + (K exp(c_last - c))^T U.

1. `chunk_solve_kernel`, one program per (chunk, batch row, value head), all in parallel: builds A as one 64x64
   block, inverts I + A by recursive block inversion (2x2 diagonal blocks, then 4x4, ..., 64x64: two products per
   level, no step waiting on a cross-thread reduction), and stores U_v = (I + A)^-1 diag(beta) V and
   U_k = (I + A)^-1 diag(beta exp(c)) K, so that U = U_v - U_k S0 once S0 is known. It stores the output's
   state-independent terms too: with P = (Q K^T * decay) the masked intra-chunk attention, O = O_v - Q_s S0 for
   O_v = P U_v and Q_s = P U_k - exp(c) Q; and the decayed keys and the chunk's total decay.
2. `chunk_scan_kernel`, one program per (batch row, value head, block of value columns), walks the chunks in
   order with the state in registers. The serial chain is what bounds long prefills, so each chunk costs two
   products: [U_k; Q_s] S0 gives U and the outputs at once (one 128-row product), then (K exp(c_last - c))^T U the
   next state.
For 16-bit models at K = 128 the products take 16-bit operands and accumulate in float32 (launch.chunk_operands
says which heads and why): float16 for the bounded ones (normalised keys and queries, the intra-chunk attention,
(I + A)^-1), the model's dtype for those carrying values and the state. Other heads, and float32 models, keep
float32 operands (tf32 for 16-bit models, tf32x3 for float32 ones). The inverse is built from float32 operands
in the solve's precision. The intermediates round-trip through memory: U_v and O_v in float32 (they scale with
v), the rest in launch.chunk_buffer_dtype.

Measured on an H100 (bf16, batch 1, device time per call: the sum of every kernel's over 20 calls,
torch.profiler), fla's chunk_gated_delta_rule in the same run as the 16-bit operands:
| heads, T | float32 operands, tf32 | 16-bit operands (this) | fla |
|---|---|---|---|
| Qwen3-Next 256 | | 29.7 us | 41.1 |
| Qwen3-Next 2048 | 354 us | 183 | 175 |
| Qwen3-Next 8192 | 1353 | 698 | 678 |
| `small` 2048 | 229 | 125 | 127 |
| `small` 8192 | | 464 | 466 |
(The float32-operand column is from an earlier run on the same inputs.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (CHUNK, chunk_buffer_dtype, chunk_operands, chunk_scan_launch, chunk_solve_precision,
                     chunk_solve_warps, dot_block)
from .triton_pdl import after_predecessors, waits


@triton.jit
def _merge_blocks(inv, A, r, c, SPAN: tl.constexpr, PREC: tl.constexpr):
    """(I + A)^-1 over diagonal blocks of SPAN rows, from `inv`, the inverse over blocks of SPAN / 2: with D^-1 the
    smaller blocks' inverse and M the entries of A inside the larger blocks but outside the smaller ones, it is
    D^-1 - D^-1 M D^-1 (recursive block inversion)."""
    between = tl.where((r // SPAN == c // SPAN) & (r // (SPAN // 2) != c // (SPAN // 2)), A, 0.0)
    return inv - tl.dot(tl.dot(inv, between, input_precision=PREC), inv, input_precision=PREC)


@triton.jit
def _unit_lower_inverse(A, r, c, PREC: tl.constexpr):
    """(I + A)^-1 for a strictly lower-triangular 64x64 A (r, c its row and column indices): the inverse over
    diagonal blocks of 2, then 4, ..., 64 rows (_merge_blocks), two products per level."""
    inv = tl.where(r == c, 1.0, 0.0) - tl.where(r // 2 == c // 2, A, 0.0)
    inv = _merge_blocks(inv, A, r, c, 4, PREC)
    inv = _merge_blocks(inv, A, r, c, 8, PREC)
    inv = _merge_blocks(inv, A, r, c, 16, PREC)
    inv = _merge_blocks(inv, A, r, c, 32, PREC)
    return _merge_blocks(inv, A, r, c, 64, PREC)


@triton.jit
def _chunk_program(T, Hv, K: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """Where a program over (chunk, batch row x value head) works, once the kernels before it have finished (with
    PDL): its chunk, batch row and value head, the chunk's 64 steps and which of them are before T, the key columns
    and the mask of live steps' key columns."""
    chunk = tl.program_id(0)
    bh = after_predecessors(tl.program_id(1), PDL)
    steps = tl.arange(0, 64)
    rows = chunk * 64 + steps
    live = rows < T
    kc = tl.arange(0, BK)
    return chunk, (bh // Hv).to(tl.int64), bh % Hv, steps, rows, live, kc, live[:, None] & (kc[None, :] < K)


@triton.jit
def _operand(x, DTYPE: tl.constexpr):
    """x as a product operand of DTYPE, a name from launch.chunk_operands."""
    if DTYPE == "float16":
        return x.to(tl.float16)
    elif DTYPE == "bfloat16":
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _l2_normalize(x):
    return x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]


@triton.jit
def chunk_solve_kernel(
    q, k, v, g, beta, u_v, w, decay,
    T, Hv,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_bb, stride_bt, stride_uvb, stride_uvh, stride_uvt, stride_wb, stride_wh, stride_wt,
    stride_db, stride_dh,
    GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, BOUNDED: tl.constexpr, FREE: tl.constexpr, PDL: tl.constexpr,
):
    """Columns of u_v per step: [U_v (V) | O_v (V)]; of w: [U_k (K) | Q_s (K) | k exp(c_last - c) (K)]; decay:
    exp(c_last) per chunk. The whole chunk as [64, *] blocks: (I + A)^-1 by recursive block inversion over 2, 4,
    ..., 64 rows, then U_v and U_k one product each, then the output's state-independent terms (the top of the
    file)."""
    chunk, b, h, steps, rows, live, kc, k_mask = _chunk_program(T, Hv, K, BK, PDL)
    vc = tl.arange(0, BV)
    # 1/sqrt(K) as a float32 tensor: a Python float argument reaches Inductor-compiled graphs as a float64 constant.
    scale = tl.rsqrt(tl.full([], K, tl.float32))
    kn = _l2_normalize(tl.load(k + b * stride_kb + (h // GROUP) * stride_kh + rows[:, None] * stride_kt + kc[None, :],
                               mask=k_mask, other=0.0).to(tl.float32))
    qn = _l2_normalize(tl.load(q + b * stride_qb + (h // GROUP) * stride_qh + rows[:, None] * stride_qt + kc[None, :],
                               mask=k_mask, other=0.0).to(tl.float32)) * scale
    bt = tl.load(beta + b * stride_bb + h + rows * stride_bt, mask=live, other=0.0).to(tl.float32)
    c = tl.cumsum(tl.load(g + b * stride_gb + h + rows * stride_gt, mask=live, other=0.0).to(tl.float32), axis=0)
    c_last = tl.sum(tl.where(steps == 63, c, 0.0), axis=0)     # padded steps carry no decay
    r, cc = steps[:, None], steps[None, :]
    # Masked before exp: above the diagonal c_i - c_j is positive and could overflow.
    below = tl.exp(tl.where(r > cc, c[:, None] - c[None, :], float("-inf")))
    kb = _operand(kn, BOUNDED)
    A = bt[:, None] * below * tl.dot(kb, tl.trans(kb), input_precision=PREC)
    inv = _unit_lower_inverse(A, r, cc, PREC)
    attn = tl.dot(_operand(qn, BOUNDED), tl.trans(kb), input_precision=PREC)
    attn = attn * tl.exp(tl.where(r >= cc, c[:, None] - c[None, :], float("-inf")))
    inv_b = _operand(inv, BOUNDED)
    after = tl.dot(_operand(attn, BOUNDED), inv_b, input_precision=PREC)  # P (I + A)^-1: O_v and Q_s from the RHS
    # Steps past T are written too (as zeros: their k, v and beta are zero), so the scan never reads memory nothing
    # wrote.
    w_rows = w + b * stride_wb + h * stride_wh + rows[:, None] * stride_wt
    dtype = w.dtype.element_ty
    k_cols = (kc < K)[None, :]
    tl.store(w_rows + 2 * K + kc[None, :], (kn * tl.exp(c_last - c)[:, None]).to(dtype), mask=k_cols)
    rk = _operand((bt * tl.exp(c))[:, None] * kn, BOUNDED)
    tl.store(w_rows + kc[None, :], tl.dot(inv_b, rk, input_precision=PREC).to(dtype), mask=k_cols)
    q_s = tl.dot(_operand(after, BOUNDED), rk, input_precision=PREC) - qn * tl.exp(c)[:, None]
    tl.store(w_rows + K + kc[None, :], q_s.to(dtype), mask=k_cols)
    rv = _operand(bt[:, None] * tl.load(v + b * stride_vb + h * stride_vh + rows[:, None] * stride_vt + vc[None, :],
                                        mask=live[:, None] & (vc[None, :] < V), other=0.0).to(tl.float32), FREE)
    uv_rows = u_v + b * stride_uvb + h * stride_uvh + rows[:, None] * stride_uvt
    v_cols = (vc < V)[None, :]
    tl.store(uv_rows + vc[None, :], tl.dot(_operand(inv, FREE), rv, input_precision=PREC), mask=v_cols)
    tl.store(uv_rows + V + vc[None, :], tl.dot(_operand(after, FREE), rv, input_precision=PREC), mask=v_cols)
    tl.store(decay + b * stride_db + h * stride_dh + chunk, tl.exp(c_last))


@triton.jit
def chunk_scan_kernel(
    u_v, w, decay, o, state, final_state, states,
    T, Hv,
    stride_uvb, stride_uvh, stride_uvt, stride_wb, stride_wh, stride_wt, stride_db, stride_dh,
    stride_ob, stride_ot, stride_oh, stride_ou, stride_sb, stride_sh, stride_cb, stride_ch,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, FREE: tl.constexpr,
    PDL: tl.constexpr, KEEP: tl.constexpr,
):
    """With KEEP (training, triton_chunk_train.py) it also stores each chunk's U, its outputs then `stride_ou`
    columns after U's in o, and its start state S_i in states [B, Hv, chunks, K, V]. (o is passed whole, not as a
    view of its outputs' columns: compiled, a view a kernel writes may be a copy of those columns alone.)"""
    bh = after_predecessors(tl.program_id(0), PDL)
    b = (bh // Hv).to(tl.int64)
    h = bh % Hv
    kc = tl.arange(0, BK)
    vc = tl.program_id(1) * BV + tl.arange(0, BV)
    uv_ptr = u_v + b * stride_uvb + h * stride_uvh
    w_ptr = w + b * stride_wb + h * stride_wh
    o_ptr = o + b * stride_ob + h * stride_oh
    d_ptr = decay + b * stride_db + h * stride_dh
    s_offsets = kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    S = tl.load(state + b * stride_sb + h * stride_sh + s_offsets, mask=s_mask, other=0.0)

    # Rows 0-63 of a chunk's stacked operands give its U, rows 64-127 its outputs (the top of the file).
    stacked = tl.arange(0, 128)
    step = stacked % 64
    half = stacked // 64
    k_cols = (kc < K)[None, :]
    v_cols = (vc < V)[None, :]
    for t0 in range(0, T, 64):
        rows = t0 + step
        w_rows = w_ptr + rows[:, None] * stride_wt
        # u_v and w hold whole chunks (zeros past T): only the column masks are needed.
        r_terms = tl.load(uv_ptr + rows[:, None] * stride_uvt + half[:, None] * V + vc[None, :], mask=v_cols,
                          other=0.0)
        l_terms = tl.load(w_rows + half[:, None] * K + kc[None, :], mask=k_cols, other=0.0)
        # k exp(c_last - c) against U only: zero where the stacked rows hold the outputs.
        k_end = tl.load(w_rows + 2 * K + kc[None, :], mask=(half == 0)[:, None] & k_cols, other=0.0)
        if KEEP:
            tl.store(states + b * stride_cb + h * stride_ch + (t0 // 64) * K * V + s_offsets, S, mask=s_mask)
        Y = r_terms - tl.dot(_operand(l_terms, FREE), _operand(S, FREE), input_precision=PREC)
        tl.store(o_ptr + rows[:, None] * stride_ot + half[:, None] * stride_ou + vc[None, :],
                 Y.to(o.dtype.element_ty), mask=(((half == 1) | KEEP) & (rows < T))[:, None] & v_cols)
        S = tl.load(d_ptr + t0 // 64) * S + tl.dot(_operand(tl.trans(k_end), FREE), _operand(Y, FREE),
                                                        input_precision=PREC)
    tl.store(final_state + b * stride_sb + h * stride_sh + s_offsets, S, mask=s_mask)


def gated_delta_rule(q, k, v, g, beta, initial_state, launch=None):
    """The contract of reference.gated_delta_rule_chunked with the state given: q, k [B,T,Hk,K]; v [B,T,Hv,V];
    g, beta [B,T,Hv]; initial_state [B,Hv,K,V] float32. Inputs may be strided views (last dim contiguous).
    Returns (o [B,T,Hv,V] in v's dtype, final state [B,Hv,K,V] float32). `launch` wraps each kernel
    (torch.library.wrap_triton inside a triton_op)."""
    B, T, Hk, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    u_v, w, decay = chunk_terms(q, k, v, g, beta, launch)
    state = initial_state.float().contiguous()
    dtype = str(v.dtype).removeprefix("torch.")
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device)
    final = torch.empty(B, Hv, K, V, dtype=torch.float32, device=v.device)
    scan = chunk_scan_launch(K, V, dtype, str(w.dtype).removeprefix("torch."))
    (launch or (lambda kernel: kernel))(chunk_scan_kernel)[(B * Hv, triton.cdiv(V, scan["BV"]))](
        u_v, w, decay, o, state, final, final, T, Hv,
        u_v.stride(0), u_v.stride(1), u_v.stride(2), w.stride(0), w.stride(1), w.stride(2), decay.stride(0),
        decay.stride(1),
        o.stride(0), o.stride(1), o.stride(2), 0, state.stride(0), state.stride(1), 0, 0,
        K=K, V=V, BK=dot_block(K), FREE=chunk_operands(dtype, K, V)["FREE"], PDL=waits(v.device), KEEP=False,
        **scan)
    return o, final


def chunk_terms(q, k, v, g, beta, launch=None):
    """The solve kernel alone (inputs as gated_delta_rule's): for n chunks of CHUNK steps, N = n * CHUNK rows
    (zeros past T), u_v [B,Hv,N,2V] float32 = [U_v | O_v], w [B,Hv,N,3K] in launch.chunk_buffer_dtype =
    [U_k | Q_s | k exp(c_last - c)], decay [B,Hv,n] float32 = exp(c_last)."""
    B, T, Hk, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g = g.float()
    dtype = str(v.dtype).removeprefix("torch.")
    n_chunks = triton.cdiv(T, CHUNK)
    operands = chunk_operands(dtype, K, V)
    # Everything the serial scan reads per step (the top of the file says in which dtypes).
    u_v = torch.empty(B, Hv, n_chunks * CHUNK, 2 * V, dtype=torch.float32, device=v.device)
    w = torch.empty(B, Hv, n_chunks * CHUNK, 3 * K, dtype=getattr(torch, chunk_buffer_dtype(dtype, K, V)),
                    device=v.device)
    decay = torch.empty(B, Hv, n_chunks, dtype=torch.float32, device=v.device)
    (launch or (lambda kernel: kernel))(chunk_solve_kernel)[(n_chunks, B * Hv)](
        q, k, v, g, beta, u_v, w, decay, T, Hv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), u_v.stride(0), u_v.stride(1),
        u_v.stride(2), w.stride(0), w.stride(1), w.stride(2), decay.stride(0), decay.stride(1),
        GROUP=Hv // Hk, K=K, V=V, BK=dot_block(K), BV=dot_block(V), PREC=chunk_solve_precision(dtype), **operands,
        PDL=waits(v.device), num_warps=chunk_solve_warps(K, V, dtype))
    return u_v, w, decay
