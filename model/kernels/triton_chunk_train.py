"""The chunked gated delta rule for training, forward and backward, as Triton kernels (reference:
reference.gated_delta_rule_chunked with autograd; ops.gated_delta_rule_train holds the autograd formula).

Forward: prefill's solve kernel (triton_chunk.chunk_terms), then its scan kernel keeping each chunk's U and start
state S_i. In each chunk (c the cumulative log-decay, P = (Q K^T * exp(c_i - c_j))_{j<=i}):
    U = W - K_c S_i,   O = O_v - Q_s S_i,   S_{i+1} = exp(c_last) S_i + E^T U,
    [W | K_c] = (I + A)^-1 [diag(beta) V | diag(beta exp(c)) K],   O_v = P W,   Q_s = P K_c - diag(exp(c)) Q,
    E = K exp(c_last - c).
Backward, three kernels:
1. `chunk_scan_backward_kernel`, the chunks in reverse order with G, the gradient at a chunk's end state, in
   registers: dU = E G, then G <- exp(c_last) G - [K_c; Q_s]^T [dU; dO] (one 128-row product, as the forward's).
2. `chunk_values_backward_kernel`, every chunk at once: (I + A)^-1 and P recomputed, then dP = dO U^T,
   dW = dU + P^T dO, dX_v = (I + A)^-T dW (v's gradient is beta dX_v) and dA = -dX_v W^T so far.
3. `chunk_keys_backward_kernel`, every chunk at once: with X = dO S_i^T and Y = dU S_i^T (the gradients of Q_s
   and K_c are -X and -Y) and Z = U G^T (that of E), q's gradient exp(c) X + (dP * decay) K, dX_k =
   (I + A)^-T (-(Y + P^T X)), dA -= dX_k K_c^T, and k's, beta's and c's through A = diag(beta) (K K^T * decay),
   P, E and the decays; the l2 norms' backward; g's gradient is c's summed over later steps.
On an H100 (bf16, `small`'s heads, batch 8 x 2048) the whole rule forward and backward took 4.7 ms in 16 kernels,
and one compiled `small` DeltaNet decoder layer 10.71 -> 9.98 ms (busy 9.92 -> 9.14, 189 -> 100 kernels) against
the chunked reference compiled by Inductor around the scan kernels. Splitting the backward's per-chunk work in
two kernels (one had taken 3.9 ms, spilling 352 registers a thread) took it to 0.92 + 1.73 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import CHUNK, chunk_operands, chunk_solve_precision, dot_block, rule_backward_launch, training_scan_launch
from .triton_chunk import _chunk_program, _operand, _unit_lower_inverse, chunk_scan_kernel, chunk_terms
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


@triton.jit
def _dot(a, b, DTYPE: tl.constexpr, PREC: tl.constexpr):
    """a @ b with both operands as DTYPE (a name from launch.chunk_operands), accumulated in float32."""
    return tl.dot(_operand(a, DTYPE), _operand(b, DTYPE), input_precision=PREC)


@triton.jit
def _unit_rows(row_starts, kc, mask):
    """The rows starting at row_starts (columns kc), l2-normalised as the op normalises q and k, and the
    reciprocals of their norms."""
    raw = tl.load(row_starts[:, None] + kc[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(raw * raw, axis=1) + 1e-6)
    return raw * r[:, None], r


@triton.jit
def _decay_on_and_below(c, r, cc):
    """exp(c_i - c_j) on and below the diagonal, masked before exp (above it the difference could overflow)."""
    return tl.exp(tl.where(r >= cc, c[:, None] - c[None, :], float("-inf")))


@triton.jit
def _chunk_forward_terms(q, k, g, beta, b, h, rows, live, kc, k_mask, stride_qb, stride_qt, stride_qh, stride_kb,
                         stride_kt, stride_kh, stride_gb, stride_gt, stride_bb, stride_bt, GROUP: tl.constexpr):
    """What both backward kernels recompute of a chunk (value head h of batch row b, steps `rows`): its unit keys
    and queries and the reciprocals of their norms, beta, the cumulative log-decay c and its last step's."""
    kn, r_k = _unit_rows(k + b * stride_kb + (h // GROUP) * stride_kh + rows * stride_kt, kc, k_mask)
    q_unit, r_q = _unit_rows(q + b * stride_qb + (h // GROUP) * stride_qh + rows * stride_qt, kc, k_mask)
    bt = tl.load(beta + b * stride_bb + h + rows * stride_bt, mask=live, other=0.0).to(tl.float32)
    c = tl.cumsum(tl.load(g + b * stride_gb + h + rows * stride_gt, mask=live, other=0.0).to(tl.float32), axis=0)
    c_last = tl.sum(tl.where(tl.arange(0, 64) == 63, c, 0.0), axis=0)     # padded steps carry no decay
    return kn, r_k, q_unit, r_q, bt, c, c_last


@triton.jit
def chunk_values_backward_kernel(
    q, k, v, g, beta, y, d_writes, dv, mats, parts,
    T, Hv,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_gb, stride_gt, stride_bb, stride_bt, stride_yb, stride_yh, stride_yt, stride_ob, stride_ot, stride_oh,
    stride_m, stride_mb, stride_mh, stride_mt, stride_p, stride_pb, stride_ph,
    GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, BOUNDED: tl.constexpr, FREE: tl.constexpr, PDL: tl.constexpr,
):
    """The backward's value side, one program per (chunk, batch row, value head): the chunk's (I + A)^-1 and P
    recomputed as chunk_solve_kernel computes them, then BV value columns at a time dP = dO U^T, dW = dU + P^T dO,
    dX_v = (I + A)^-T dW (v's gradient beta dX_v), and dX_v's part of dA. Stores v's gradient, and for
    chunk_keys_backward_kernel mats [4, B, Hv, N, 64] = [(I + A)^-1 | P | dP * decay | dA so far] and parts
    [2, B, Hv, N] = [c's gradient so far | beta's so far]. y and d_writes [B, Hv, N, 2V] hold U and [dU | dO]."""
    chunk, b, h, steps, rows, live, kc, k_mask = _chunk_program(T, Hv, K, BK, PDL)
    scale = tl.rsqrt(tl.full([], K, tl.float32))
    kn, r_k, q_unit, r_q, bt, c, c_last = _chunk_forward_terms(
        q, k, g, beta, b, h, rows, live, kc, k_mask, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_gb, stride_gt, stride_bb, stride_bt, GROUP)
    r, cc = steps[:, None], steps[None, :]
    lower = _decay_on_and_below(c, r, cc)
    kb = _operand(kn, BOUNDED)
    A = tl.where(r > cc, bt[:, None] * lower * tl.dot(kb, tl.trans(kb), input_precision=PREC), 0.0)
    inv = _unit_lower_inverse(A, r, cc, PREC)
    P = tl.dot(_operand(q_unit * scale, BOUNDED), tl.trans(kb), input_precision=PREC) * lower

    y_rows = y + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt
    dw_rows = d_writes + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt
    dP = tl.zeros([64, 64], dtype=tl.float32)
    dA = tl.zeros([64, 64], dtype=tl.float32)
    d_beta = tl.zeros([64], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        v_cols = vc[None, :] < V
        # y and d_writes hold whole chunks (zeros past T): only the column masks are needed.
        d_o = tl.load(dw_rows + V + vc[None, :], mask=v_cols, other=0.0)
        d_u = tl.load(dw_rows + vc[None, :], mask=v_cols, other=0.0)
        u = tl.load(y_rows + vc[None, :], mask=v_cols, other=0.0)
        values = tl.load(v + b * stride_vb + h * stride_vh + rows[:, None] * stride_vt + vc[None, :],
                         mask=live[:, None] & v_cols, other=0.0).to(tl.float32)
        dP += _dot(d_o, tl.trans(u), FREE, PREC)
        d_rv = _dot(tl.trans(inv), d_u + _dot(tl.trans(P), d_o, FREE, PREC), FREE, PREC)
        tl.store(dv + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + vc[None, :],
                 bt[:, None] * d_rv, mask=live[:, None] & v_cols)
        d_beta += tl.sum(d_rv * values, axis=1)
        dA -= _dot(d_rv, tl.trans(_dot(inv, bt[:, None] * values, FREE, PREC)), FREE, PREC)
    dP = tl.where(r >= cc, dP, 0.0)
    dPP = dP * P
    m_rows = mats + b * stride_mb + h * stride_mh + rows[:, None] * stride_mt + cc
    tl.store(m_rows, inv)
    tl.store(m_rows + stride_m, P)
    tl.store(m_rows + 2 * stride_m, dP * lower)
    tl.store(m_rows + 3 * stride_m, dA)
    p_rows = parts + b * stride_pb + h * stride_ph + rows
    tl.store(p_rows, tl.sum(dPP, axis=1) - tl.sum(dPP, axis=0))
    tl.store(p_rows + stride_p, d_beta)


@triton.jit
def chunk_keys_backward_kernel(
    q, k, g, beta, y, d_writes, states, d_ends, mats, parts, dq, dk, dg, dbeta,
    T, Hv,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_gb, stride_gt, stride_bb, stride_bt,
    stride_yb, stride_yh, stride_yt, stride_sb, stride_sh, stride_m, stride_mb, stride_mh, stride_mt, stride_p,
    stride_pb, stride_ph, stride_xb, stride_xt, stride_xh, stride_zb, stride_zt,
    GROUP: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr, BOUNDED: tl.constexpr, FREE: tl.constexpr, PDL: tl.constexpr,
):
    """The backward's key side, after chunk_values_backward_kernel (whose mats and parts it reads), one program
    per (chunk, batch row, value head): X = dO S^T and Y = dU S^T give the gradients of Q_s and U_k (-X, -Y), Z =
    U G^T that of k exp(c_last - c), <S, G> that of exp(c_last); then dA complete, through A = diag(beta) (k k^T *
    decay). Stores the gradients of q and k per value head (through the l2 norm), of g and of beta. states and
    d_ends [B, Hv, n, K, V] hold S_i and G_i."""
    chunk, b, h, steps, rows, live, kc, k_mask = _chunk_program(T, Hv, K, BK, PDL)
    scale = tl.rsqrt(tl.full([], K, tl.float32))
    kn, r_k, q_unit, r_q, bt, c, c_last = _chunk_forward_terms(
        q, k, g, beta, b, h, rows, live, kc, k_mask, stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
        stride_gb, stride_gt, stride_bb, stride_bt, GROUP)
    ec = tl.exp(c)
    r, cc = steps[:, None], steps[None, :]
    m_rows = mats + b * stride_mb + h * stride_mh + rows[:, None] * stride_mt + cc
    p_rows = parts + b * stride_pb + h * stride_ph + rows
    dc = tl.load(p_rows)
    d_beta = tl.load(p_rows + stride_p)
    y_rows = y + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt
    dw_rows = d_writes + b * stride_yb + h * stride_yh + rows[:, None] * stride_yt
    s_ptr = states + b * stride_sb + h * stride_sh + chunk * K * V
    e_ptr = d_ends + b * stride_sb + h * stride_sh + chunk * K * V
    X = tl.zeros([64, BK], dtype=tl.float32)
    Y = tl.zeros([64, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        v_cols = vc[None, :] < V
        S = tl.load(s_ptr + kc[:, None] * V + vc[None, :], mask=(kc[:, None] < K) & v_cols, other=0.0)
        X += _dot(tl.load(dw_rows + V + vc[None, :], mask=v_cols, other=0.0), tl.trans(S), FREE, PREC)
        Y += _dot(tl.load(dw_rows + vc[None, :], mask=v_cols, other=0.0), tl.trans(S), FREE, PREC)
    dS = tl.load(m_rows + 2 * stride_m)
    d_qn = ec[:, None] * X + _dot(dS, kn, FREE, PREC)
    dc += ec * tl.sum(q_unit * scale * X, axis=1)
    d_qu = d_qn * scale
    tl.store(dq + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + kc[None, :],
             r_q[:, None] * (d_qu - q_unit * tl.sum(q_unit * d_qu, axis=1)[:, None]), mask=k_mask)
    inv = tl.load(m_rows)
    d_rk = _dot(tl.trans(inv), -(Y + _dot(tl.trans(tl.load(m_rows + stride_m)), X, FREE, PREC)), FREE, PREC)
    rk_scale = bt * ec
    dA = tl.load(m_rows + 3 * stride_m) - _dot(d_rk, tl.trans(_dot(inv, rk_scale[:, None] * kn, FREE, PREC)),
                                                FREE, PREC)
    rk_dot = tl.sum(d_rk * kn, axis=1)
    d_beta += ec * rk_dot
    dc += rk_scale * rk_dot
    d_kn = rk_scale[:, None] * d_rk + _dot(tl.trans(dS), q_unit * scale, FREE, PREC)
    Z = tl.zeros([64, BK], dtype=tl.float32)
    d_decay = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        v_cols = vc[None, :] < V
        s_mask = (kc[:, None] < K) & v_cols
        G = tl.load(e_ptr + kc[:, None] * V + vc[None, :], mask=s_mask, other=0.0)
        S = tl.load(s_ptr + kc[:, None] * V + vc[None, :], mask=s_mask, other=0.0)
        d_decay += tl.sum(S * G, axis=1)
        Z += _dot(tl.load(y_rows + vc[None, :], mask=v_cols, other=0.0), tl.trans(G), FREE, PREC)
    to_end = tl.exp(c_last - c)
    d_kn += to_end[:, None] * Z
    z_dot = to_end * tl.sum(Z * kn, axis=1)
    dc -= z_dot
    dc += tl.where(steps == 63, tl.sum(z_dot, axis=0) + tl.sum(d_decay, axis=0) * tl.exp(c_last), 0.0)

    # dA = -(dX_v W^T + dX_k U_k^T) below the diagonal, through A = diag(beta) (k k^T * decay).
    kb = _operand(kn, BOUNDED)
    KK = tl.dot(kb, tl.trans(kb), input_precision=PREC)
    dKK = tl.where(r > cc, dA, 0.0) * _decay_on_and_below(c, r, cc)
    d_beta += tl.sum(dKK * KK, axis=1)
    dAA = bt[:, None] * dKK * KK
    dc += tl.sum(dAA, axis=1) - tl.sum(dAA, axis=0)
    D = bt[:, None] * dKK
    d_kn += _dot(D, kn, FREE, PREC) + _dot(tl.trans(D), kn, FREE, PREC)
    tl.store(dk + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt + kc[None, :],
             r_k[:, None] * (d_kn - kn * tl.sum(kn * d_kn, axis=1)[:, None]), mask=k_mask)
    # c = cumsum(g): g_j's gradient sums dc over steps j and later.
    dg_rows = tl.sum(dc, axis=0) - tl.cumsum(dc, axis=0) + dc
    tl.store(dg + b * stride_zb + h + rows * stride_zt, dg_rows, mask=live)
    tl.store(dbeta + b * stride_zb + h + rows * stride_zt, d_beta, mask=live)


def _launch(writes, terms, dtype):
    """Blocks, precisions, warps and stages of both kernels (launch.training_scan_launch) for a model of `dtype`
    (writes' own when None)."""
    K, V = terms.shape[-1] // 3, writes.shape[-1] // 2
    dtype = dtype or str(writes.dtype).removeprefix("torch.")
    scan = training_scan_launch(K, V, dtype, str(terms.dtype).removeprefix("torch."),
                                writes.shape[0] * writes.shape[1], str(writes.dtype).removeprefix("torch."))
    return dict(K=K, V=V, BK=dot_block(K), FREE=chunk_operands(dtype, K, V)["FREE"], PDL=waits(writes.device),
                **scan)


def chunk_scan(writes, terms, decay, state, launch=None, dtype=None):
    """reference.chunk_scan's contract at chunks of CHUNK steps (writes and terms contiguous, state float32); the
    products take the operands of a model of `dtype` (launch.chunk_operands; writes' dtype when None)."""
    B, H, N, _ = writes.shape
    options = _launch(writes, terms, dtype)
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


def chunk_scan_backward(dy, terms, decay, d_final, launch=None, dtype=None):
    """reference.chunk_scan_backward's contract at chunks of CHUNK steps (dy and terms contiguous; `dtype` as
    chunk_scan's)."""
    B, H, N, _ = dy.shape
    options = _launch(dy, terms, dtype)
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


def gated_delta_rule_forward(q, k, v, g, beta, initial_state, launch=None):
    """Training's chunked rule forward (reference.gated_delta_rule_chunked's contract, chunks of CHUNK steps; q, k
    raw, the state given): prefill's solve kernel, then the scan keeping what the backward needs. Returns (o, final
    state, w, decay, states, y): w and decay as chunk_terms makes them, states and y as chunk_scan's."""
    B, T, Hv, V = v.shape
    u_v, w, decay = chunk_terms(q, k, v, g, beta, launch)
    y, states, final = chunk_scan(u_v, w, decay, initial_state.float().contiguous(), launch,
                                  str(v.dtype).removeprefix("torch."))
    # A copy in any dtype: an op's outputs must not be views of each other.
    o = torch.empty(B, T, Hv, V, dtype=v.dtype, device=v.device).copy_(y[:, :, :T, V:].transpose(1, 2))
    return o, final, w, decay, states, y


def gated_delta_rule_backward(q, k, v, g, beta, w, decay, states, y, d_o, d_final, launch=None):
    """The gradients of gated_delta_rule_forward's o and final state (d_o [B,T,Hv,V], d_final [B,Hv,K,V]) with
    respect to q, k, v, g, beta (in their dtypes) and the initial state (float32): the reverse scan, then
    chunk_values_backward_kernel and chunk_keys_backward_kernel for every chunk at once; q's and k's gradients per
    value head are summed over each key head's group."""
    B, T, Hk, K = k.shape
    Hv, V, N = v.shape[2], v.shape[3], y.shape[2]
    dy = y.new_zeros(B, Hv, N, 2 * V)
    dy[:, :, :T, V:] = d_o.transpose(1, 2)
    dtype = str(v.dtype).removeprefix("torch.")
    d_writes, d_ends, d_state = chunk_scan_backward(dy, w, decay, d_final.float().contiguous(), launch, dtype)
    dtypes = [x.dtype for x in (q, k, v, g, beta)]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g = g.float()
    dq = torch.empty(B, T, Hv, K, dtype=torch.float32, device=v.device)
    dk = torch.empty_like(dq)
    dv = torch.empty(B, T, Hv, V, dtype=torch.float32, device=v.device)
    dg = torch.empty(B, T, Hv, dtype=torch.float32, device=v.device)
    dbeta = torch.empty_like(dg)
    mats = torch.empty(4, B, Hv, N, CHUNK, dtype=torch.float32, device=v.device)
    parts = torch.empty(2, B, Hv, N, dtype=torch.float32, device=v.device)
    wrap = launch or (lambda kernel: kernel)
    common = dict(GROUP=Hv // Hk, K=K, V=V, BK=dot_block(K), PREC=chunk_solve_precision(dtype),
                  **chunk_operands(dtype, K, V), PDL=waits(v.device), **rule_backward_launch(K, V, dtype))
    qk_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    gate_strides = (g.stride(0), g.stride(1), beta.stride(0), beta.stride(1))
    y_strides = (y.stride(0), y.stride(1), y.stride(2))
    m_strides = (mats.stride(0), mats.stride(1), mats.stride(2), mats.stride(3), parts.stride(0), parts.stride(1),
                 parts.stride(2))
    wrap(chunk_values_backward_kernel)[(N // CHUNK, B * Hv)](
        q, k, v, g, beta, y, d_writes, dv, mats, parts, T, Hv, *qk_strides, v.stride(0), v.stride(1), v.stride(2),
        *gate_strides, *y_strides, dv.stride(0), dv.stride(1), dv.stride(2), *m_strides, **common)
    wrap(chunk_keys_backward_kernel)[(N // CHUNK, B * Hv)](
        q, k, g, beta, y, d_writes, states, d_ends, mats, parts, dq, dk, dg, dbeta, T, Hv, *qk_strides,
        *gate_strides, *y_strides, states.stride(0), states.stride(1), *m_strides, dq.stride(0), dq.stride(1),
        dq.stride(2), dg.stride(0), dg.stride(1), **common)
    if Hv != Hk:
        dq, dk = (x.view(B, T, Hk, Hv // Hk, K).sum(3) for x in (dq, dk))
    return (*(d.to(dtype) for d, dtype in zip((dq, dk, dv, dg, dbeta), dtypes)), d_state)
