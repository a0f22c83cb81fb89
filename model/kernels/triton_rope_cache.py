"""A cached attention layer's inputs in one launch (reference: reference.norm_rope_cache): per-head RMSNorm of q
and k, partial rotary embedding, and the new k and v written into the KV caches.

Left to Inductor, these are eight small kernels per attention layer at a decode step (a norm's statistics and its
rotary halves for q and for k, two cache writes, the slots' positions): at `tiny`'s size each costs a launch
and nothing more. One program per (row and step, head) holds the head's D channels: q heads write the query the
attention kernel reads, KV heads write their key and value into the caches at the step's position. Each value is
rounded to the input dtype after the norm, as the separate ops round, and once more after the rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pdl import after_predecessors, waits


@triton.jit
def _norm_rotate(src, norm_weight, c, partner, ok, rotated, first_half, cos, sin, eps, D: tl.constexpr):
    """One head's D channels from `src`: RMSNorm (x̂ * (1 + w)) rounded to the input dtype, then the rotation of
    the first channels (cos and sin are 1 and 0 past them), in float32."""
    x = tl.load(src + c, mask=ok, other=0.0)
    xp = tl.load(src + partner, mask=rotated, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    # As float32: a Python float argument reaches Inductor-compiled graphs as float64.
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps).to(tl.float32)
    xn = (xf * rstd * (1.0 + tl.load(norm_weight + c, mask=ok, other=0.0).to(tl.float32))).to(x.dtype)
    xpn = (xp * rstd * (1.0 + tl.load(norm_weight + partner, mask=rotated, other=0.0).to(tl.float32))).to(x.dtype)
    return xn.to(tl.float32) * cos + tl.where(first_half, -1.0, 1.0) * xpn.to(tl.float32) * sin


@triton.jit
def norm_rope_cache_kernel(
    q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, q_out,
    T, eps,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_cb, stride_ct, stride_sb, stride_st, stride_pb, stride_pt,
    stride_kcb, stride_kch, stride_kcs, stride_vcb, stride_vch, stride_vcs,
    H: tl.constexpr, D: tl.constexpr, ROT: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
):
    bt = after_predecessors(tl.program_id(0), PDL)
    head = tl.program_id(1)
    b = (bt // T).to(tl.int64)
    t = bt % T
    c = tl.arange(0, BD)
    ok = c < D
    rotated = c < ROT
    first_half = c < ROT // 2
    partner = tl.where(first_half, c + ROT // 2, c - ROT // 2)       # the channel each rotated one pairs with
    cs = tl.load(cos + b * stride_cb + t * stride_ct + c, mask=rotated, other=1.0).to(tl.float32)
    sn = tl.load(sin + b * stride_sb + t * stride_st + c, mask=rotated, other=0.0).to(tl.float32)
    if head < H:
        y = _norm_rotate(q + b * stride_qb + t * stride_qt + head * stride_qh, q_norm_weight, c, partner, ok, rotated,
                         first_half, cs, sn, eps, D)
        # [B, H, T, D]: seen as [B, Hkv, H/Hkv * T, D], row r is query head r // T of its group at step r % T.
        tl.store(q_out + ((b * H + head) * T + t) * D + c, y.to(q_out.dtype.element_ty), mask=ok)
    else:
        hk = head - H
        pos = tl.load(positions + b * stride_pb + t * stride_pt).to(tl.int64)
        key = _norm_rotate(k + b * stride_kb + t * stride_kt + hk * stride_kh, k_norm_weight, c, partner, ok, rotated,
                           first_half, cs, sn, eps, D)
        # Rounded to k's dtype first, as the model's k is, then to the cache's. (A name of its own: Triton merges a
        # name assigned in both branches, and the two would differ in dtype.)
        key = key.to(k.dtype.element_ty).to(key_cache.dtype.element_ty)
        tl.store(key_cache + b * stride_kcb + hk * stride_kch + pos * stride_kcs + c, key, mask=ok)
        vt = tl.load(v + b * stride_vb + t * stride_vt + hk * stride_vh + c, mask=ok, other=0.0)
        tl.store(value_cache + b * stride_vcb + hk * stride_vch + pos * stride_vcs + c,
                 vt.to(value_cache.dtype.element_ty), mask=ok)


def norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, eps: float,
                    launch=None):
    """See reference.norm_rope_cache for the contract. Returns [B, Hkv, H/Hkv * T, D] in q's dtype; writes the
    caches in place."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q, k, v, cos, sin = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, cos, sin))
    q_out = torch.empty(B, H, T, D, dtype=q.dtype, device=q.device)
    kernel = launch(norm_rope_cache_kernel) if launch else norm_rope_cache_kernel
    kernel[(B * T, H + Hkv)](
        q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, q_out, T, eps,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2], *sin.stride()[:2], *positions.stride(),
        *key_cache.stride()[:3], *value_cache.stride()[:3],
        H=H, D=D, ROT=cos.shape[-1], BD=triton.next_power_of_2(D), PDL=waits(q.device), num_warps=1 if D <= 128 else 2)
    return q_out.view(B, Hkv, H // Hkv * T, D)
