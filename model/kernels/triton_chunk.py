"""Chunked gated delta rule for prefill, in two Triton kernels (reference: reference.gated_delta_rule_chunked).

Per value head the sequence is cut into chunks of 64 steps. With c the cumulative log-decay inside a chunk and
S0 the state at its start, the chunk's writes U solve the unit-lower-triangular system

    (I + A) U = diag(beta) V - diag(beta * exp(c)) K S0,    A_ij = beta_i exp(c_i - c_j) k_i.k_j   (j < i)

and its outputs and next state are  O = exp(c) Q S0 + (Q K^T * decay) U,  S = exp(c_last) S0 + (K exp(c_last - c))^T U.

1. `chunk_solve_kernel`, one program per (chunk, batch row, value head), all in parallel: builds A in 16x16
   blocks and solves by block forward substitution (the diagonal blocks inverted by recursive block inversion,
   matrix products off the diagonal), storing U_v = (I + A)^-1 diag(beta) V and U_k = (I + A)^-1 diag(beta exp(c)) K,
   so that U = U_v - U_k S0 once S0 is known.
   The same program then stores everything else that does not depend on S0 (normalised and decayed q and k, the
   masked intra-chunk attention, the chunk's total decay).
   On an H100 (bf16, batch 1, Qwen3-Next's heads) this kernel is most of the rule's time: at T = 8192 it took
   1392 us (the scan 616) with a row-at-a-time substitution on the diagonal blocks, 1030 us with the block
   inversion and 964 us with the intra-chunk attention in the solve's precision (tf32 for 16-bit models, where it
   was tf32x3 always); fla's whole rule took 572 us. ptxas (sm_90, 8 warps) still spills about 900 bytes.
2. `chunk_scan_kernel`, one program per (batch row, value head, block of value columns), walks the chunks in
   order with the state in registers, doing only the four matrix products that need it: the serial chain is
   what bounds long prefills, so it holds nothing that could be computed ahead.
The intermediates round-trip through memory: U_v in float32 (it scales with v), the rest (each entry at most 1 in
magnitude: normalised keys and queries times decays <= 1) in float16 for 16-bit models, float32 for float32 ones.
Half the bytes let the scan pipeline two chunks' loads through shared memory (float32 operands need 245-262 KB at
K = 128, more than an H100's 227 KB): on an H100, bf16, batch 1, the rule at Qwen3-Next's heads took 1.93 against
2.33 ms at T = 8192 and 0.50 against 0.60 at T = 2048, and its errors against float64 did not grow (output 1.8e-3
against 2.0e-3). The state stays float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CHUNK, chunk_buffer_dtype, chunk_scan_launch, chunk_solve_precision, chunk_solve_warps, dot_block

SUB = tl.constexpr(16)   # block size of the triangular solve


@triton.jit
def _unit_lower_inverse(A):
    """(I + A)^-1 for a strictly lower triangular [16, 16] A, by recursive block inversion: with D^-1 the inverse of
    the block diagonal of 2x2, then 4x4, 8x8 blocks and M the entries of I + A inside the blocks twice that size
    but outside those, the inverse over the larger blocks is D^-1 - D^-1 M D^-1. Two float32 products per level,
    and no step waits on a reduction across the program's threads, as a row-at-a-time substitution did (two per
    row)."""
    rows = tl.arange(0, SUB)
    r, c = rows[:, None], rows[None, :]
    inv = tl.where(r == c, 1.0, 0.0) - tl.where(r // 2 == c // 2, A, 0.0)
    inv = _merge_blocks(inv, A, r, c, 4)
    inv = _merge_blocks(inv, A, r, c, 8)
    return _merge_blocks(inv, A, r, c, 16)


@triton.jit
def _merge_blocks(inv, A, r, c, SPAN: tl.constexpr):
    """The inverse over blocks of SPAN from `inv`, the inverse over blocks of SPAN / 2."""
    between = tl.where((r // SPAN == c // SPAN) & (r // (SPAN // 2) != c // (SPAN // 2)), A, 0.0)
    return inv - tl.dot(tl.dot(inv, between, input_precision="ieee"), inv, input_precision="ieee")


@triton.jit
def _load_block(ptr, row0, T, stride_t, cols, n_cols, other):
    rows = row0 + tl.arange(0, SUB)
    return tl.load(ptr + rows[:, None] * stride_t + cols[None, :],
                   mask=(rows[:, None] < T) & (cols[None, :] < n_cols), other=other).to(tl.float32)


@triton.jit
def _load_vec(ptr, row0, T, stride_t):
    rows = row0 + tl.arange(0, SUB)
    return tl.load(ptr + rows * stride_t, mask=rows < T, other=0.0).to(tl.float32)


@triton.jit
def _l2_normalize(x):
    return x * tl.rsqrt(tl.sum(x * x, axis=1) + 1e-6)[:, None]


@triton.jit
def _off_diagonal(k_i, k_j, beta_i, c_i, c_j, PREC: tl.constexpr):
    """Block (i, j), i > j, of A: every entry lies below the diagonal."""
    kk = tl.dot(k_i, tl.trans(k_j), input_precision=PREC)
    return beta_i[:, None] * tl.exp(c_i[:, None] - c_j[None, :]) * kk


@triton.jit
def _diagonal(k_i, beta_i, c_i, PREC: tl.constexpr):
    rows = tl.arange(0, SUB)
    below = rows[:, None] > rows[None, :]
    kk = tl.dot(k_i, tl.trans(k_i), input_precision=PREC)
    # Masked before exp: above the diagonal c_i - c_j is positive and could overflow.
    decay = tl.exp(tl.where(below, c_i[:, None] - c_i[None, :], float("-inf")))
    return beta_i[:, None] * decay * kk


@triton.jit
def chunk_solve_kernel(
    q, k, v, g, beta, u_v, w, decay,
    T, Hv,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_bb, stride_bt, stride_uvb, stride_uvh, stride_uvt, stride_wb, stride_wh, stride_wt,
    stride_db, stride_dh,
    GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """u_v: U_v per step; columns of w per step: [U_k (K) | q exp(c) / sqrt(K) (K) | k exp(c_last - c) (K) | attn row
    (64)]; decay: exp(c_last) per chunk."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hv).to(tl.int64)
    h = bh % Hv
    t0 = chunk * 64
    kc = tl.arange(0, BK)
    vc = tl.arange(0, BV)
    k_ptr = k + b * stride_kb + (h // GROUP) * stride_kh
    v_ptr = v + b * stride_vb + h * stride_vh
    g_ptr = g + b * stride_gb + h
    beta_ptr = beta + b * stride_bb + h

    # Four row blocks of 16 steps (Triton cannot slice register tensors, so each block is its own variable).
    k0 = _l2_normalize(_load_block(k_ptr, t0, T, stride_kt, kc, K, 0.0))
    k1 = _l2_normalize(_load_block(k_ptr, t0 + 16, T, stride_kt, kc, K, 0.0))
    k2 = _l2_normalize(_load_block(k_ptr, t0 + 32, T, stride_kt, kc, K, 0.0))
    k3 = _l2_normalize(_load_block(k_ptr, t0 + 48, T, stride_kt, kc, K, 0.0))
    b0 = _load_vec(beta_ptr, t0, T, stride_bt)
    b1 = _load_vec(beta_ptr, t0 + 16, T, stride_bt)
    b2 = _load_vec(beta_ptr, t0 + 32, T, stride_bt)
    b3 = _load_vec(beta_ptr, t0 + 48, T, stride_bt)
    g0 = _load_vec(g_ptr, t0, T, stride_gt)
    g1 = _load_vec(g_ptr, t0 + 16, T, stride_gt)
    g2 = _load_vec(g_ptr, t0 + 32, T, stride_gt)
    g3 = _load_vec(g_ptr, t0 + 48, T, stride_gt)
    c0 = tl.cumsum(g0, axis=0)
    c1 = tl.cumsum(g1, axis=0) + tl.sum(g0, axis=0)
    c2 = tl.cumsum(g2, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0)
    c3 = tl.cumsum(g3, axis=0) + tl.sum(g0, axis=0) + tl.sum(g1, axis=0) + tl.sum(g2, axis=0)

    d0 = _unit_lower_inverse(_diagonal(k0, b0, c0, PREC))
    d1 = _unit_lower_inverse(_diagonal(k1, b1, c1, PREC))
    d2 = _unit_lower_inverse(_diagonal(k2, b2, c2, PREC))
    d3 = _unit_lower_inverse(_diagonal(k3, b3, c3, PREC))
    a10 = _off_diagonal(k1, k0, b1, c1, c0, PREC)
    a20 = _off_diagonal(k2, k0, b2, c2, c0, PREC)
    a21 = _off_diagonal(k2, k1, b2, c2, c1, PREC)
    a30 = _off_diagonal(k3, k0, b3, c3, c0, PREC)
    a31 = _off_diagonal(k3, k1, b3, c3, c1, PREC)
    a32 = _off_diagonal(k3, k2, b3, c3, c2, PREC)

    # Right-hand sides: beta * v and beta * exp(c) * k, per row block.
    rv0 = b0[:, None] * _load_block(v_ptr, t0, T, stride_vt, vc, V, 0.0)
    rv1 = b1[:, None] * _load_block(v_ptr, t0 + 16, T, stride_vt, vc, V, 0.0)
    rv2 = b2[:, None] * _load_block(v_ptr, t0 + 32, T, stride_vt, vc, V, 0.0)
    rv3 = b3[:, None] * _load_block(v_ptr, t0 + 48, T, stride_vt, vc, V, 0.0)
    rk0 = (b0 * tl.exp(c0))[:, None] * k0
    rk1 = (b1 * tl.exp(c1))[:, None] * k1
    rk2 = (b2 * tl.exp(c2))[:, None] * k2
    rk3 = (b3 * tl.exp(c3))[:, None] * k3

    # Block forward substitution: U_i = D_i^-1 (R_i - sum_{j<i} A_ij U_j).
    uv0 = tl.dot(d0, rv0, input_precision=PREC)
    uk0 = tl.dot(d0, rk0, input_precision=PREC)
    uv1 = tl.dot(d1, rv1 - tl.dot(a10, uv0, input_precision=PREC), input_precision=PREC)
    uk1 = tl.dot(d1, rk1 - tl.dot(a10, uk0, input_precision=PREC), input_precision=PREC)
    uv2 = tl.dot(d2, rv2 - tl.dot(a20, uv0, input_precision=PREC) - tl.dot(a21, uv1, input_precision=PREC),
                 input_precision=PREC)
    uk2 = tl.dot(d2, rk2 - tl.dot(a20, uk0, input_precision=PREC) - tl.dot(a21, uk1, input_precision=PREC),
                 input_precision=PREC)
    uv3 = tl.dot(d3, rv3 - tl.dot(a30, uv0, input_precision=PREC) - tl.dot(a31, uv1, input_precision=PREC)
                 - tl.dot(a32, uv2, input_precision=PREC), input_precision=PREC)
    uk3 = tl.dot(d3, rk3 - tl.dot(a30, uk0, input_precision=PREC) - tl.dot(a31, uk1, input_precision=PREC)
                 - tl.dot(a32, uk2, input_precision=PREC), input_precision=PREC)

    # Steps past T are written too (as zeros: their k, v and beta are zero), so the scan never reads memory nothing
    # wrote.
    uv_ptr = u_v + b * stride_uvb + h * stride_uvh
    _store_block(uv_ptr, t0, t0 + 64, stride_uvt, vc, V, uv0)
    _store_block(uv_ptr, t0 + 16, t0 + 64, stride_uvt, vc, V, uv1)
    _store_block(uv_ptr, t0 + 32, t0 + 64, stride_uvt, vc, V, uv2)
    _store_block(uv_ptr, t0 + 48, t0 + 64, stride_uvt, vc, V, uv3)
    w_ptr = w + b * stride_wb + h * stride_wh
    _store_block(w_ptr, t0, t0 + 64, stride_wt, kc, K, uk0)
    _store_block(w_ptr, t0 + 16, t0 + 64, stride_wt, kc, K, uk1)
    _store_block(w_ptr, t0 + 32, t0 + 64, stride_wt, kc, K, uk2)
    _store_block(w_ptr, t0 + 48, t0 + 64, stride_wt, kc, K, uk3)
    _chunk_terms(q, k, g, w, decay, T, b, h, chunk, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_gb, stride_gt, stride_wb, stride_wh, stride_wt, stride_db, stride_dh, GROUP, K, BK, PREC)


@triton.jit
def _chunk_terms(q, k, g, w, decay, T, b, h, chunk,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_gb, stride_gt,
                 stride_wb, stride_wh, stride_wt, stride_db, stride_dh,
                 GROUP: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """What else the scan needs that does not depend on the state: normalised and decayed q and k, the masked
    intra-chunk attention and the chunk's total decay, for the whole chunk in one block of 64 rows."""
    kc = tl.arange(0, BK)
    steps = tl.arange(0, 64)
    rows = chunk * 64 + steps
    live = rows < T
    k_mask = live[:, None] & (kc[None, :] < K)
    # 1/sqrt(K) as a float32 tensor: a Python float argument reaches Inductor-compiled graphs as a float64 constant.
    scale = tl.rsqrt(tl.full([], K, tl.float32))
    qn = _l2_normalize(tl.load(q + b * stride_qb + (h // GROUP) * stride_qh + rows[:, None] * stride_qt + kc[None, :],
                               mask=k_mask, other=0.0).to(tl.float32)) * scale
    kn = _l2_normalize(tl.load(k + b * stride_kb + (h // GROUP) * stride_kh + rows[:, None] * stride_kt + kc[None, :],
                               mask=k_mask, other=0.0).to(tl.float32))
    c = tl.cumsum(tl.load(g + b * stride_gb + h + rows * stride_gt, mask=live, other=0.0).to(tl.float32), axis=0)
    c_last = tl.sum(tl.where(steps == 63, c, 0.0), axis=0)     # padded steps carry no decay
    causal = steps[:, None] >= steps[None, :]
    attn = tl.dot(qn, tl.trans(kn), input_precision=PREC)
    attn = attn * tl.exp(tl.where(causal, c[:, None] - c[None, :], float("-inf")))
    w_rows = w + b * stride_wb + h * stride_wh + rows[:, None] * stride_wt
    dtype = w.dtype.element_ty
    # Every step of the chunk, past T too (zeros), like the solve kernel's columns.
    k_cols = (kc < K)[None, :]
    tl.store(w_rows + K + kc[None, :], (qn * tl.exp(c)[:, None]).to(dtype), mask=k_cols)
    tl.store(w_rows + 2 * K + kc[None, :], (kn * tl.exp(c_last - c)[:, None]).to(dtype), mask=k_cols)
    tl.store(w_rows + 3 * K + steps[None, :], attn.to(dtype))
    tl.store(decay + b * stride_db + h * stride_dh + chunk, tl.exp(c_last))


@triton.jit
def chunk_scan_kernel(
    u_v, w, decay, o, state, final_state,
    T, Hv,
    stride_uvb, stride_uvh, stride_uvt, stride_wb, stride_wh, stride_wt, stride_db, stride_dh,
    stride_ob, stride_ot, stride_oh, stride_sb, stride_sh,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
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

    steps = tl.arange(0, 64)
    causal = steps[:, None] >= steps[None, :]
    k_cols = (kc < K)[None, :]
    v_cols = (vc < V)[None, :]
    for t0 in range(0, T, 64):
        rows = t0 + steps
        w_rows = w_ptr + rows[:, None] * stride_wt
        # u_v and w hold whole chunks (zeros past T): only the column masks are needed.
        u_v_t = tl.load(uv_ptr + rows[:, None] * stride_uvt + vc[None, :], mask=v_cols, other=0.0)
        u_k = tl.load(w_rows + kc[None, :], mask=k_cols, other=0.0).to(tl.float32)
        q_dec = tl.load(w_rows + K + kc[None, :], mask=k_cols, other=0.0).to(tl.float32)
        k_end = tl.load(w_rows + 2 * K + kc[None, :], mask=k_cols, other=0.0).to(tl.float32)
        attn = tl.load(w_rows + 3 * K + steps[None, :], mask=causal, other=0.0).to(tl.float32)
        U = u_v_t - tl.dot(u_k, S, input_precision=PREC)
        out = tl.dot(q_dec, S, input_precision=PREC) + tl.dot(attn, U, input_precision=PREC)
        tl.store(o_ptr + rows[:, None] * stride_ot + vc[None, :], out.to(o.dtype.element_ty),
                 mask=(rows < T)[:, None] & v_cols)
        S = tl.load(d_ptr + t0 // 64) * S + tl.dot(tl.trans(k_end), U, input_precision=PREC)
    tl.store(final_state + b * stride_sb + h * stride_sh + s_offsets, S, mask=s_mask)


@triton.jit
def _store_block(ptr, row0, T, stride_t, cols, n_cols, value):
    rows = row0 + tl.arange(0, SUB)
    tl.store(ptr + rows[:, None] * stride_t + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < T) & (cols[None, :] < n_cols))


def gated_delta_rule(q, k, v, g, beta, initial_state, launch=None):
    """The contract of reference.gated_delta_rule_chunked with the state given: q, k [B,T,Hk,K]; v [B,T,Hv,V];
    g, beta [B,T,Hv]; initial_state [B,Hv,K,V] float32. Inputs may be strided views (last dim contiguous).
    Returns (o [B,T,Hv,V] in v's dtype, final state [B,Hv,K,V] float32). `launch` wraps each kernel
    (torch.library.wrap_triton inside a triton_op)."""
    B, T, Hk, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g = g.float()
    state = initial_state.float().contiguous()
    wrap = launch or (lambda kernel: kernel)
    dtype = str(v.dtype).removeprefix("torch.")
    BK, BVfull = dot_block(K), dot_block(V)
    n_chunks = triton.cdiv(T, CHUNK)
    buffer_dtype = chunk_buffer_dtype(dtype)
    # Everything the serial scan reads per step. The scan computes in float32 even for 16-bit models (its 16-bit
    # tensor-core path faulted on the H100 for K = 128, Triton 3.6); for them it reads w in float16 (see the top).
    u_v = torch.empty(B, Hv, n_chunks * CHUNK, V, dtype=torch.float32, device=v.device)
    w = torch.empty(B, Hv, n_chunks * CHUNK, 3 * K + CHUNK, dtype=getattr(torch, buffer_dtype), device=v.device)
    decay = torch.empty(B, Hv, n_chunks, dtype=torch.float32, device=v.device)
    wrap(chunk_solve_kernel)[(n_chunks, B * Hv)](
        q, k, v, g, beta, u_v, w, decay, T, Hv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), g.stride(0), g.stride(1), beta.stride(0), beta.stride(1), u_v.stride(0), u_v.stride(1),
        u_v.stride(2), w.stride(0), w.stride(1), w.stride(2), decay.stride(0), decay.stride(1),
        GROUP=Hv // Hk, K=K, V=V, BK=BK, BV=BVfull, PREC=chunk_solve_precision(dtype), num_warps=chunk_solve_warps(K))
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device)
    final = torch.empty(B, Hv, K, V, dtype=torch.float32, device=v.device)
    scan = chunk_scan_launch(K, V, dtype, buffer_dtype)
    wrap(chunk_scan_kernel)[(B * Hv, triton.cdiv(V, scan["BV"]))](
        u_v, w, decay, o, state, final, T, Hv,
        u_v.stride(0), u_v.stride(1), u_v.stride(2), w.stride(0), w.stride(1), w.stride(2), decay.stride(0),
        decay.stride(1),
        o.stride(0), o.stride(1), o.stride(2), state.stride(0), state.stride(1),
        K=K, V=V, BK=BK, **scan)
    return o, final
