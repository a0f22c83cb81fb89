"""The whole Gated DeltaNet token mixer for a decode step, in one Triton launch per layer
(reference: reference.gated_deltanet_decode).

From the layer's raw projections (qkvz and ba, in the grouped-by-key-head layout of `in_proj_qkvz` /
`in_proj_ba`) to the gated-normed output that `out_proj` takes: conv1d update + SiLU, l2-normalised q and k,
g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), decay + delta-rule update + output, gated RMSNorm.
The conv and recurrent states live in pools addressed by a slot per batch row: read from `conv_state` /
`rec_state` and written to `conv_state_out` / `rec_state_out`, which may be the same buffers (the torch op updates
in place; TensorRT binds past and present state to one buffer). A negative slot is a padding row: its output is zero
and no state changes, so one CUDA graph captured at a batch bucket serves fewer live rows.

One program per (batch row, value head), with the head's [K, V] state in registers, looping over the T steps (1
for decode, a few for speculative steps). Its v conv channels are its own; the q and k conv channels are shared
by the value heads of one key head, so the last of them to finish (an atomic arrival count) shifts that state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import decode_warps
from .reference import decode_heads
from .triton_pdl import after_predecessors, waits


@triton.jit
def _conv_silu(qkvz_row, stride_t, col, state_row, channel, weight, t, n, mask, W: tl.constexpr):
    """SiLU(conv) at step t of `n` channels: inputs at steps t-W+1..t come from qkvz columns `col` (for steps
    >= 0 of this call) or from the incoming conv state of channels `channel` (for earlier steps)."""
    acc = tl.zeros(col.shape, dtype=tl.float32)
    for j in tl.static_range(W):
        src = t - (W - 1) + j
        x = tl.load(qkvz_row + src * stride_t + col, mask=mask & (src >= 0), other=0.0).to(tl.float32)
        s = tl.load(state_row + channel * (W - 1) + (src + (W - 1)), mask=mask & (src < 0), other=0.0).to(tl.float32)
        acc += (x + s) * tl.load(weight + channel * W + j, mask=mask, other=0.0).to(tl.float32)
    return acc * tl.sigmoid(acc)


@triton.jit
def _shift_conv_state(qkvz_row, stride_t, col, state_row, out_row, channel, T, mask, W: tl.constexpr):
    """Write the outgoing conv state (the last W-1 inputs of [state, x]) of these channels to `out_row`. Tap j takes
    input T-(W-1)+j, from x, or from incoming tap j+T: a tap not yet overwritten when out_row is state_row, since
    taps go in order."""
    for j in tl.static_range(W - 1):
        src = T - (W - 1) + j
        x = tl.load(qkvz_row + src * stride_t + col, mask=mask & (src >= 0), other=0.0)
        s = tl.load(state_row + channel * (W - 1) + (src + (W - 1)), mask=mask & (src < 0), other=0.0)
        tl.store(out_row + channel * (W - 1) + j, tl.where(src >= 0, x.to(s.dtype), s), mask=mask)


@triton.jit
def gated_deltanet_decode_kernel(
    qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, rec_state, conv_state_out, rec_state_out, slots,
    out, arrivals,
    T, eps,
    stride_qb, stride_qt, stride_bab, stride_bat, stride_cs, stride_rs, stride_ob, stride_ot,
    HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr, PDL: tl.constexpr,
):
    b = after_predecessors(tl.program_id(0), PDL).to(tl.int64)
    h = tl.program_id(1)
    hk = h // GROUP
    j = h % GROUP                                          # this value head's place in its key head's group
    if HAS_SLOTS:
        slot = tl.load(slots + b).to(tl.int64)
    else:
        slot = b
    kc = tl.arange(0, BK)
    vc = tl.arange(0, BV)
    k_ok = kc < K
    v_ok = vc < V
    out_ptr = out + b * stride_ob + h * V + vc
    if slot < 0:
        for t in range(T):
            tl.store(out_ptr + t * stride_ot, tl.zeros([BV], out.dtype.element_ty), mask=v_ok)
    else:
        s_offsets = slot * stride_rs + h * K * V + kc[:, None] * V + vc[None, :]
        s_mask = k_ok[:, None] & v_ok[None, :]
        S = tl.load(rec_state + s_offsets, mask=s_mask, other=0.0)
        qkvz_row = qkvz + b * stride_qb
        ba_row = ba + b * stride_bab
        state_row = conv_state + slot * stride_cs
        out_row = conv_state_out + slot * stride_cs
        head_cols = hk * (2 * K + 2 * GROUP * V)           # the key head's [q | k | v group | z group] columns
        q_col, k_col = head_cols + kc, head_cols + K + kc
        v_col = head_cols + 2 * K + j * V + vc
        z_col = head_cols + 2 * K + GROUP * V + j * V + vc
        q_chan, k_chan = hk * K + kc, HK * K + hk * K + kc  # conv channels: [all q | all k | all v]
        v_chan = 2 * HK * K + h * V + vc
        # 1/sqrt(K) as a float32 tensor: a Python float argument reaches Inductor-compiled graphs as float64.
        scale = tl.rsqrt(tl.full([], K, tl.float32))
        neg_A = -tl.exp(tl.load(A_log + h).to(tl.float32))
        bias = tl.load(dt_bias + h).to(tl.float32)
        norm_w = tl.load(norm_weight + vc, mask=v_ok, other=0.0).to(tl.float32)
        for t in range(T):
            # The loads that depend on nothing else first, so that at T = 1 they overlap the conv's loads rather
            # than each adding a trip to memory after the arithmetic.
            a = tl.load(ba_row + t * stride_bat + hk * 2 * GROUP + GROUP + j).to(tl.float32) + bias
            beta = tl.sigmoid(tl.load(ba_row + t * stride_bat + hk * 2 * GROUP + j).to(tl.float32))
            z = tl.load(qkvz_row + t * stride_qt + z_col, mask=v_ok, other=0.0).to(tl.float32)
            q = _conv_silu(qkvz_row, stride_qt, q_col, state_row, q_chan, conv_weight, t, K, k_ok, W)
            k = _conv_silu(qkvz_row, stride_qt, k_col, state_row, k_chan, conv_weight, t, K, k_ok, W)
            v = _conv_silu(qkvz_row, stride_qt, v_col, state_row, v_chan, conv_weight, t, V, v_ok, W)
            q = q * tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale
            k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
            softplus = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))
            S = S * tl.exp(neg_A * softplus)
            delta = beta * (v - tl.sum(S * k[:, None], axis=0))
            S = S + k[:, None] * delta[None, :]
            o = tl.sum(S * q[:, None], axis=0)
            o = o * tl.rsqrt(tl.sum(o * o, axis=0) / V + eps).to(tl.float32)
            tl.store(out_ptr + t * stride_ot, (o * norm_w * z * tl.sigmoid(z)).to(out.dtype.element_ty), mask=v_ok)
        # The steps above were the last reads of the incoming conv state. Its v channels are this head's alone;
        # its q and k channels are read by every value head of the key head, so the last of them to get here
        # shifts those (the acq_rel counter orders the others' reads before its writes) and zeroes the counter, so
        # a buffer zeroed once serves every later launch. The barrier: every thread's reads are done. Counted
        # before the recurrent state's store, so that the release does not wait for that store to drain.
        tl.debug_barrier()
        last = True
        if GROUP > 1:
            last = tl.atomic_add(arrivals + b * HK + hk, 1, sem="acq_rel") == GROUP - 1
        tl.store(rec_state_out + s_offsets, S, mask=s_mask)
        _shift_conv_state(qkvz_row, stride_qt, v_col, state_row, out_row, v_chan, T, v_ok, W)
        if last:
            tl.debug_barrier()
            _shift_conv_state(qkvz_row, stride_qt, q_col, state_row, out_row, q_chan, T, k_ok, W)
            _shift_conv_state(qkvz_row, stride_qt, k_col, state_row, out_row, k_chan, T, k_ok, W)
            if GROUP > 1:
                tl.store(arrivals + b * HK + hk, 0)


def gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, slots,
                          eps: float, launch=None, num_warps: int | None = None):
    """See reference.gated_deltanet_decode for the contract. Returns o [B, T, Hv*V] in qkvz's dtype; updates
    conv_state [P, conv_dim, W-1] and recurrent_state [P, Hv, K, V] (float32) in place at rows `slots` (None: rows
    0..B-1, read from the program's place, where a tensor of them would cost a kernel of its own in every layer).
    One program per (batch row, value head), with launch.decode_warps warps unless told. Splitting V over several
    programs per head (tried: 2, 4, 8) was no faster at 128 x 128 and twice as slow at 64 x 64 on an H100."""
    B, T, _ = qkvz.shape
    Hk, Hv, K, V = decode_heads(conv_weight, A_log, norm_weight, recurrent_state)
    W = conv_weight.shape[-1]
    qkvz, ba = (x if x.stride(-1) == 1 else x.contiguous() for x in (qkvz, ba))
    out = torch.empty(B, T, Hv * V, dtype=qkvz.dtype, device=qkvz.device)
    # Per (row, key head): how many of its value heads have finished reading the q/k conv state.
    arrivals = torch.zeros(B, Hk, dtype=torch.int32, device=qkvz.device) if Hv > Hk else out
    kernel = launch(gated_deltanet_decode_kernel) if launch else gated_deltanet_decode_kernel
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    kernel[(B, Hv)](
        qkvz, ba, conv_weight.contiguous(), A_log, dt_bias, norm_weight, conv_state, recurrent_state, conv_state,
        recurrent_state, out if slots is None else slots, out, arrivals, T, eps,
        qkvz.stride(0), qkvz.stride(1), ba.stride(0), ba.stride(1), conv_state.stride(0), recurrent_state.stride(0),
        out.stride(0), out.stride(1),
        HK=Hk, K=K, V=V, GROUP=Hv // Hk, W=W, BK=BK, BV=BV, HAS_SLOTS=slots is not None,
        PDL=waits(qkvz.device), num_warps=num_warps or decode_warps(K, V))
    return out
