"""Plain PyTorch reference kernels. They run anywhere (CPU, CUDA, float64) and define the op contracts.

Gated delta rule, per value head h (key head h // (Hv // Hk)), with S a [K, V] matrix:
    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T (q_t / sqrt(K))
where q_t, k_t are l2-normalised inside the op. Recurrent state is kept in float32 (float64 inputs stay float64).

Causal conv1d: depthwise, kernel width W, SiLU fused; the state holds the last W-1 inputs per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # rsqrt(sum + eps), not x / max(norm, eps): the form fla and transformers use, so logits agree bit-closely.
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, initial_state):
    """Normalise q/k, expand key heads to value heads, move to [B, H, T, D] in the state's precision."""
    B, T, Hk, K = k.shape
    Hv, V = v.shape[2], v.shape[3]
    if Hv % Hk:
        raise ValueError(f"value heads ({Hv}) must be a multiple of key heads ({Hk})")
    dtype = torch.promote_types(torch.float32, v.dtype)
    q, k = (l2_normalize(x.to(dtype)).repeat_interleave(Hv // Hk, dim=2) for x in (q, k))
    q = q * K**-0.5
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    g, beta = (x.to(dtype).transpose(1, 2) for x in (g, beta))
    if initial_state is None:
        state = torch.zeros(B, Hv, K, V, dtype=dtype, device=v.device)
    else:
        state = initial_state.to(dtype)
    return q, k, v, g, beta, state


def gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=None):
    """Token-by-token recurrence. q, k: [B,T,Hk,K]; v: [B,T,Hv,V]; g, beta: [B,T,Hv]; state [B,Hv,K,V].

    Returns (o [B,T,Hv,V] in v's dtype, final state [B,Hv,K,V] in float32 or float64).
    """
    out_dtype = v.dtype
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, initial_state)
    outputs = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t, None, None].exp()
        predicted = torch.einsum("bhkv,bhk->bhv", S, k[:, :, t])
        delta = beta[:, :, t, None] * (v[:, :, t] - predicted)
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, :, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape).transpose(1, 2)
    return o.to(out_dtype), S


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower-triangular A [..., C, C]: A is nilpotent, so the inverse is the finite series
    sum_j (-A)^j = (I - A)(I + A^2)(I + A^4)..., 2 log2(C) - 2 batched products (10 at C = 64). On an H100 cuBLAS's
    batched triangular solve took 16% of small's compiled training step (58 ms, forward and backward) where
    products are what GPUs do fast."""
    power = -A
    inverse = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) + power
    for _ in range(max(0, (A.shape[-1] - 1).bit_length() - 1)):
        power = power @ power
        inverse = inverse + inverse @ power
    return inverse


class UnitLowerInverse(torch.autograd.Function):
    """unit_lower_inverse with the inverse's own gradient, -M^-T dX M^-T (M = I + A), in two products rather than
    the backward of the ten in the series."""

    @staticmethod
    def forward(ctx, A):
        inverse = unit_lower_inverse(A)
        ctx.save_for_backward(inverse)
        return inverse

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return -(inverse.mT @ grad @ inverse.mT)


def gated_delta_rule_chunked(q, k, v, g, beta, initial_state=None, chunk_size: int = 64, scan=None):
    """Same contract as `gated_delta_rule_recurrent`, computed a chunk at a time with the UT transform.

    Inside a chunk with cumulative log-decay c_i and chunk-start state S0, the writes u_j = beta_j (v_j - ...)
    solve the unit-lower-triangular system
        (I + A) U = diag(beta) V - diag(beta * exp(c)) K S0,   A_ij = beta_i exp(c_i - c_j) k_i.k_j  (j < i),
    after which outputs and the next state are matrix products:
        O = diag(exp(c)) Q S0 + (Q K^T * exp(c_i - c_j))_{j<=i} U,   S = exp(c_last) S0 + (K * exp(c_last - c))^T U.
    Everything but S0 is computed for all chunks at once; `scan` (chunk_scan's contract; chunk_scan itself when
    None) then walks the chunks in order.
    """
    out_dtype = v.dtype
    T = v.shape[1]
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, initial_state)
    B, H, _, Kd = k.shape
    Vd = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    # Padded steps have beta = 0 (no write) and g = 0 (no decay), so they leave the state untouched.
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, -1) for x in (q, k, v))
    g, beta = (x.reshape(B, H, n, C) for x in (g, beta))

    c = g.cumsum(-1)                                           # [B,H,n,C]
    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    # Mask before exp: entries above the diagonal would overflow.
    decay_ij = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    strict = decay_ij.masked_fill(torch.eye(C, dtype=torch.bool, device=v.device), 0.0)
    A = beta[..., None] * (k @ k.transpose(-1, -2)) * strict
    rhs = torch.cat([beta[..., None] * v, (beta * c.exp())[..., None] * k], dim=-1)
    solved = UnitLowerInverse.apply(A) @ rhs                   # [W | K_c]: U = W - K_c S0
    attn = (q @ k.transpose(-1, -2)) * decay_ij
    after = attn @ solved                                      # [O_v | P K_c]: O = O_v - (P K_c - Q exp(c)) S0
    writes = torch.cat([solved[..., :Vd], after[..., :Vd]], dim=-1)
    # In the products' dtype: under autocast the scan multiplies in it anyway.
    terms = torch.cat([solved[..., Vd:], after[..., Vd:] - q * c.exp()[..., None],
                       k * (c[..., -1:] - c).exp()[..., None]], dim=-1).to(writes.dtype)
    y, _, S = (scan or chunk_scan)(writes.reshape(B, H, n * C, 2 * Vd), terms.reshape(B, H, n * C, 3 * Kd),
                                   c[..., -1].exp(), S)
    o = y[:, :, :T, Vd:]
    return o.transpose(1, 2).to(out_dtype), S


def chunk_scan(writes, terms, decay, state):
    """The chunked gated delta rule's serial part (gated_delta_rule_chunked): the chunks in order, each two products
    with the state at its start. writes [B,H,N,2V] = [W | O_v] and terms [B,H,N,3K] = [K_c | Q_s | E] per step,
    N = n chunks of C steps; decay [B,H,n]; state [B,H,K,V]. With S_i the state at chunk i's start (`state` first):
        U_i = W_i - K_c,i S_i,   O_i = O_v,i - Q_s,i S_i,   S_{i+1} = decay_i S_i + E_i^T U_i.
    Returns (y [B,H,N,2V] = [U | O] in writes' dtype, states [B,H,n,K,V] = every S_i, final state S_n), the states
    in `state`'s dtype."""
    B, H, N, _ = writes.shape
    n, K, V = decay.shape[-1], terms.shape[-1] // 3, writes.shape[-1] // 2
    writes, terms = (x.view(B, H, n, N // n, -1) for x in (writes, terms))
    ys, states = [], []
    for i in range(n):
        states.append(state)
        S = state.to(terms.dtype)
        u = (writes[:, :, i, :, :V] - terms[:, :, i, :, :K] @ S).to(writes.dtype)
        o = (writes[:, :, i, :, V:] - terms[:, :, i, :, K:2 * K] @ S).to(writes.dtype)
        ys.append(torch.cat([u, o], dim=-1))
        state = decay[:, :, i, None, None] * state + terms[:, :, i, :, 2 * K:].transpose(-1, -2) @ u
    return torch.stack(ys, dim=2).view(B, H, N, 2 * V), torch.stack(states, dim=2), state


def chunk_scan_backward(dy, terms, decay, d_final):
    """chunk_scan's serial backward: the gradients of its y and final state carried back through the chunks in
    reverse order. dy [B,H,N,2V]; terms and decay as chunk_scan took them; d_final [B,H,K,V]. Returns (d_writes
    [B,H,N,2V] in dy's dtype, d_ends [B,H,n,K,V]: the gradient at each chunk's end state S_{i+1}, d_state: at the
    first chunk's start). With G = d_ends[i]:
        dU_i = dy_U,i + E_i G,   d_writes_i = [dU_i | dy_O,i],   dS_i = decay_i G - K_c,i^T dU_i - Q_s,i^T dy_O,i.
    The rest of chunk_scan's gradients are products of these with the states (triton_chunk_train.py)."""
    B, H, N, _ = dy.shape
    n, K, V = decay.shape[-1], terms.shape[-1] // 3, dy.shape[-1] // 2
    dy, terms = (x.view(B, H, n, N // n, -1) for x in (dy, terms))
    G = d_final
    d_writes, d_ends = [None] * n, [None] * n
    for i in reversed(range(n)):
        d_ends[i] = G
        du = dy[:, :, i, :, :V] + terms[:, :, i, :, 2 * K:] @ G.to(terms.dtype)
        d_writes[i] = torch.cat([du.to(dy.dtype), dy[:, :, i, :, V:]], dim=-1)
        G = decay[:, :, i, None, None] * G - terms[:, :, i, :, :K].transpose(-1, -2) @ du.to(terms.dtype) \
            - terms[:, :, i, :, K:2 * K].transpose(-1, -2) @ dy[:, :, i, :, V:].to(terms.dtype)
    return torch.stack(d_writes, dim=2).view(B, H, N, 2 * V), torch.stack(d_ends, dim=2), G


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None):
    """x: [B,T,C]; weight: [C,W]; state: [B,C,W-1] (the W-1 inputs before x) or None for zeros.

    Returns (silu(conv(x)) [B,T,C] in x's dtype, new state [B,C,W-1] = the last W-1 inputs).
    """
    B, T, C = x.shape
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, C, width - 1, dtype=weight.dtype)
    full = torch.cat([state.to(weight.dtype).transpose(1, 2), x.to(weight.dtype)], dim=1)   # [B, W-1+T, C]
    # A sum of W shifted products, not F.conv1d: compiled, forward and backward are each one fused kernel (a
    # depthwise conv1d's three cuDNN/ATen kernels took 9% of small's compiled training step on an H100).
    y = F.silu(sum(full[:, i:i + T] * weight[:, i] for i in range(width)))
    return y.to(x.dtype), full[:, full.shape[1] - (width - 1):].transpose(1, 2)


# ---- the Gated DeltaNet layer around the two kernels: layout, gates, output norm, and the fused decode step ----


def split_projections(qkvz: torch.Tensor, ba: torch.Tensor, num_k_heads: int, head_k_dim: int, head_v_dim: int):
    """The raw projections are grouped by key head: per key head [q | k | v-group | z-group] and [b-group | a-group].
    Returns q, k [B,T,Hk,K]; v, z [B,T,Hv,V]; b, a [B,T,Hv]."""
    B, T, _ = qkvz.shape
    K, V = head_k_dim, head_v_dim
    r = ba.shape[-1] // (2 * num_k_heads)
    qkvz = qkvz.view(B, T, num_k_heads, -1)
    q, k, v, z = qkvz.split([K, K, r * V, r * V], dim=-1)
    Hv = num_k_heads * r
    return (q, k, v.reshape(B, T, Hv, V), z.reshape(B, T, Hv, V), *split_gates(ba, num_k_heads))


def split_gates(ba: torch.Tensor, num_k_heads: int):
    """b, a [B,T,Hv] from the raw projection ba (per key head [b-group | a-group])."""
    B, T, _ = ba.shape
    r = ba.shape[-1] // (2 * num_k_heads)
    b, a = ba.view(B, T, num_k_heads, 2 * r).split([r, r], dim=-1)
    return b.reshape(B, T, -1), a.reshape(B, T, -1)


def conv_input(qkvz: torch.Tensor, num_k_heads: int, head_k_dim: int):
    """The conv's input [B,T,C], C = 2 Hk K + Hv V, from a Gated DeltaNet projection qkvz (grouped by key head, see
    split_projections): its q, k and v columns as [all q | all k | all v]."""
    B, T, _ = qkvz.shape
    grouped = qkvz.view(B, T, num_k_heads, -1)
    v_cols = (grouped.shape[-1] - 2 * head_k_dim) // 2
    q, k, v, _ = grouped.split([head_k_dim, head_k_dim, v_cols, v_cols], dim=-1)
    return torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)


def causal_conv1d_grouped(qkvz: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None, num_k_heads: int,
                          head_k_dim: int):
    """causal_conv1d of conv_input(qkvz, ...): the conv over a projection's q, k and v columns."""
    return causal_conv1d(conv_input(qkvz, num_k_heads, head_k_dim), weight, state)


def decay_and_beta(a, b, A_log, dt_bias):
    """g = -exp(A_log) * softplus(a + dt_bias) in float32 (fp16 would overflow exp), beta = sigmoid(b)."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.sigmoid()


def gated_rms_norm(x, z, weight, eps: float):
    """DeltaNet output norm over the last dim: x̂ * w * silu(z). The weight multiplies in x's dtype, the gate in
    float32 (transformers' rounding)."""
    dtype = x.dtype
    return (weight * _normalized(x, eps).to(dtype) * F.silu(z.float())).to(dtype)


def _normalized(x, eps: float):
    """x̂ = x / rms(x) over the last dim, in float32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x, weight, eps: float):
    """The decoder's RMSNorm over the last dim: x̂ * (1 + w), computed in float32, returned in x's dtype."""
    return (_normalized(x, eps) * (1.0 + weight.float())).type_as(x)


def fused_linear(x, weight, bias=None, norm_weight=None, up=None, residual=None, eps: float = 1e-6,
                 float_output: bool = False):
    """A linear layer with the pointwise work around it: prologue(x) @ weight.T (+ bias) (+ residual).

    The prologue is the decoder's RMSNorm with `norm_weight` (rms_norm), or SwiGLU's silu(x) * `up` where `up` is
    given (x is then the gate), or nothing. x, up: [..., K]; weight [N, K]; bias [N]; residual [..., N]. Returns
    [..., N] in x's dtype, each step rounded to it as separate torch ops would; with `float_output`, in float32 (or
    x's dtype where wider): logits, which a kernel can return unrounded (here the product is rounded first). Their
    rounding is what costs a 16-bit model accuracy, not the normalized input's: for a trained `tiny` in bfloat16
    (CPU, 1,024 teacher-forced tokens) top-1 agreement with float32 is 0.983 with bfloat16 logits, 0.993 with
    float32 ones from the same rounded input, and 0.993 with nothing rounded after the last decoder layer."""
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    elif up is not None:
        x = F.silu(x) * up
    y = F.linear(x, weight, bias)
    y = y if residual is None else y + residual
    return y.to(torch.promote_types(y.dtype, torch.float32)) if float_output else y


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotates the first cos.shape[-1] channels (half-split convention), passes the rest."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def norm_rope(x, norm_weight, cos, sin, eps: float):
    """Attention heads x [B,T,H,D] RMSNorm-ed per head (rms_norm), then rotated (apply_partial_rotary): [B,H,T,D]."""
    return apply_partial_rotary(rms_norm(x, norm_weight, eps).transpose(1, 2), cos, sin)


def norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, eps: float):
    """A cached attention layer's inputs from its projections: q and k each normed and rotated (norm_rope), then
    k and v written into the caches at `positions`, in place.

    q [B,T,H,D], k and v [B,T,Hkv,D] (views of the projections' outputs); q_norm_weight, k_norm_weight [D];
    cos, sin [B,T,rot]; positions [B,T]; key_cache, value_cache [B,Hkv,S,D]. Returns the queries as
    decode_attention takes them: [B, Hkv, H/Hkv * T, D], row r the query head r // T of the group at step r % T.
    """
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    q, k = norm_rope(q, q_norm_weight, cos, sin, eps), norm_rope(k, k_norm_weight, cos, sin, eps)
    # index_put_ rather than scatter_: Inductor turns an index_put into an in-place write of the T new slots,
    # while a scatter into a graph input becomes a copy of the whole cache each step.
    rows = torch.arange(B, device=q.device)[:, None]
    key_cache[rows, :, positions] = k.transpose(1, 2).to(key_cache.dtype)
    value_cache[rows, :, positions] = v.to(value_cache.dtype)
    # The query heads sharing a KV head (head h uses KV head h // groups) become more query rows of that head, so
    # the cache is read as it is rather than copied once per query head.
    return q.contiguous().view(B, Hkv, H // Hkv * T, D)


def _write_live_rows(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """pool[slots[i]] = rows[i] for every slot >= 0, in place; negative slots write nothing. Each pool row takes
    the value of the first live batch row that names it (an index_copy_ with clamped padding slots could let a
    padding row's stale copy land last)."""
    P, B = pool.shape[0], slots.shape[0]
    live = slots >= 0
    writer = torch.where(live, torch.arange(B, device=slots.device), B)
    owner = torch.full((P,), B, dtype=writer.dtype, device=slots.device)
    owner = owner.scatter_reduce(0, slots.clamp(min=0).long(), writer, reduce="amin")
    candidates = torch.cat([rows.to(pool.dtype), pool[:1]])
    keep = (owner == B).view(P, *[1] * (pool.dim() - 1))
    pool.copy_(torch.where(keep, pool, candidates[owner]))


def decode_heads(conv_weight, A_log, norm_weight, recurrent_state) -> tuple[int, int, int, int]:
    """(Hk, Hv, K, V) of a fused decode step's arguments: the conv channels are all q, all k (Hk*K each), all v."""
    Hv, V, K = A_log.shape[0], norm_weight.shape[0], recurrent_state.shape[2]
    return (conv_weight.shape[0] - Hv * V) // (2 * K), Hv, K, V


def gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, slots,
                          eps: float):
    """A whole Gated DeltaNet token mixer for a few steps, between in_proj_{qkvz,ba} and out_proj.

    qkvz [B,T,Hk*(2K+2rV)], ba [B,T,2Hv] (raw projections, see split_projections); conv_weight [conv_dim,W];
    A_log, dt_bias [Hv]; norm_weight [V]; conv_state [P,conv_dim,W-1] and recurrent_state [P,Hv,K,V] (float32):
    pools whose row slots[i] is batch row i's state, updated in place; slots [B] integer, negative for padding
    rows (output zero, no state touched), or None for rows 0..B-1. Returns o [B,T,Hv*V] in qkvz's dtype.
    """
    B, T, _ = qkvz.shape
    if slots is None:
        slots = torch.arange(B, dtype=torch.int32, device=qkvz.device)
    Hk, Hv, K, V = decode_heads(conv_weight, A_log, norm_weight, recurrent_state)
    q, k, v, z, b, a = split_projections(qkvz, ba, Hk, K, V)
    rows = slots.clamp(min=0).long()
    mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
    mixed, new_conv = causal_conv1d(mixed, conv_weight, conv_state.index_select(0, rows))
    q, k, v = mixed.split([Hk * K, Hk * K, Hv * V], dim=-1)
    g, beta = decay_and_beta(a, b, A_log, dt_bias)
    o, new_state = gated_delta_rule_recurrent(q.reshape(B, T, Hk, K), k.reshape(B, T, Hk, K),
                                              v.reshape(B, T, Hv, V), g, beta, recurrent_state.index_select(0, rows))
    _write_live_rows(conv_state, slots, new_conv)
    _write_live_rows(recurrent_state, slots, new_state)
    o = gated_rms_norm(o, z, norm_weight, eps).reshape(B, T, Hv * V)
    return torch.where((slots >= 0)[:, None, None], o, torch.zeros((), dtype=o.dtype, device=o.device))


# cuDNN's attention rebuilds its execution plan whenever the attended length changes, which it does at every
# decode step: 28 ms of host time per call on an H100 (torch 2.11). The other backends have no such cost.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode_attention(q, key_cache, value_cache, positions):
    """Attention of new tokens over a KV cache, as the model's cached attention computes it.

    q [B, Hkv, R, D]: the query heads sharing KV head h, then the T steps (row r is query head r // T of the group at
    step r % T); key_cache, value_cache [B, Hkv, S, D]; positions [B, T]: each step's slot, which sees the slots at or
    before it. Returns [B, Hkv, R, D] in q's dtype, softmax scale 1/sqrt(D).
    """
    B, Hkv, R, D = q.shape
    T, S = positions.shape[1], key_cache.shape[2]
    visible = torch.arange(S, device=q.device)[None, None, :] <= positions[:, :, None]        # [B, T, S]
    mask = visible[:, None, None].expand(B, 1, R // T, T, S).reshape(B, 1, R, S)
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, key_cache.to(q.dtype), value_cache.to(q.dtype), attn_mask=mask)
