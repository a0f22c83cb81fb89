"""Reference kernels: chunked vs token-by-token vs an independent float64 loop; conv1d with state."""

import contextlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.kernels import reference as ref


def float64_loop(q, k, v, g, beta, state):
    """The recurrence written out per batch row, head and step, in float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, Hk, K = q.shape
    Hv, V = v.shape[2:]
    S = torch.zeros(B, Hv, K, V, dtype=torch.float64) if state is None else state.double().clone()
    out = torch.empty(B, T, Hv, V, dtype=torch.float64)
    for b in range(B):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            for t in range(T):
                qt = q[b, t, kh] / q[b, t, kh].norm() / K**0.5
                kt = k[b, t, kh] / k[b, t, kh].norm()
                S[b, h] *= torch.exp(g[b, t, h])
                S[b, h] += beta[b, t, h] * torch.outer(kt, v[b, t, h] - S[b, h].T @ kt)
                out[b, t, h] = S[b, h].T @ qt
    return out, S


def chunk_terms64(q, k, v, g, beta, chunk=64):
    """What the chunked rule computes before it needs the state, in float64 and in the layout of the Triton solve
    kernel's outputs (model/kernels/triton_chunk.py): u [B, Hv, N*chunk, 2V+3K] with per step the columns
    [U_v | P U_v | U_k | P U_k - q exp(c)/sqrt(K) | k exp(c_last - c)] (P the masked intra-chunk attention), zeros
    past T, and decay [B, Hv, N] = exp(c_last), for N chunks."""
    B, T, Hk, K = k.shape
    Hv, V = v.shape[2:]
    qn, kn, v, g, beta, _ = ref._prepare(*(x.double() for x in (q, k, v, g, beta)), None)
    n = -(-T // chunk)
    u = torch.zeros(B, Hv, n * chunk, 2 * V + 3 * K, dtype=torch.float64)
    decay = torch.empty(B, Hv, n, dtype=torch.float64)
    for i, t0 in enumerate(range(0, T, chunk)):
        s = slice(t0, min(T, t0 + chunk))
        c = g[:, :, s].cumsum(-1)
        L = c.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        decay_ij = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        A = beta[:, :, s, None] * (kn[:, :, s] @ kn[:, :, s].transpose(-1, -2)) * decay_ij.tril(-1)
        rhs = torch.cat([beta[:, :, s, None] * v[:, :, s], (beta[:, :, s] * c.exp())[..., None] * kn[:, :, s]], -1)
        U = torch.linalg.solve_triangular(torch.eye(L, dtype=A.dtype) + A, rhs, upper=False, unitriangular=True)
        P = (qn[:, :, s] @ kn[:, :, s].transpose(-1, -2)) * decay_ij
        u[:, :, s, :V] = U[..., :V]
        u[:, :, s, V:2 * V] = P @ U[..., :V]
        u[:, :, s, 2 * V:2 * V + K] = U[..., V:]
        u[:, :, s, 2 * V + K:2 * V + 2 * K] = P @ U[..., V:] - qn[:, :, s] * c.exp()[..., None]
        u[:, :, s, 2 * V + 2 * K:] = kn[:, :, s] * (c[..., -1:] - c).exp()[..., None]
        decay[:, :, i] = c[..., -1].exp()
    return u, decay


def random_inputs(B, T, Hk, Hv, K, V, with_state, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, Hk, K, generator=g), torch.randn(B, T, Hk, K, generator=g)
    v = torch.randn(B, T, Hv, V, generator=g)
    decay = -torch.rand(B, T, Hv, generator=g) * 3           # log-space decay <= 0
    beta = torch.rand(B, T, Hv, generator=g)
    state = torch.randn(B, Hv, K, V, generator=g) if with_state else None
    return q, k, v, decay, beta, state


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("T", [1, 7, 64, 131])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (2, 6)])
def test_gated_delta_rule_forms_agree(T, with_state, heads):
    Hk, Hv = heads
    inputs = random_inputs(2, T, Hk, Hv, 16, 12, with_state, seed=T * 10 + Hv)
    o64, s64 = float64_loop(*inputs)
    o_rec, s_rec = ref.gated_delta_rule_recurrent(*inputs)
    o_chk, s_chk = ref.gated_delta_rule_chunked(*inputs, chunk_size=32)
    assert s_rec.dtype == s_chk.dtype == torch.float32
    for o, s in ((o_rec, s_rec), (o_chk, s_chk)):
        assert rel(o, o64) < 1e-5 and rel(s, s64) < 1e-5


@pytest.mark.parametrize("C", [1, 2, 5, 16, 33, 64])
def test_unit_lower_inverse_and_its_gradient(C):
    g = torch.Generator().manual_seed(C)
    A = (torch.randn(2, 3, C, C, generator=g, dtype=torch.float64) * 0.3).tril(-1).requires_grad_()
    eye = torch.eye(C, dtype=torch.float64)
    torch.testing.assert_close(ref.UnitLowerInverse.apply(A), torch.linalg.inv(eye + A), rtol=1e-10, atol=1e-10)
    weights = torch.randn(2, 3, C, C, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad((ref.UnitLowerInverse.apply(A) * weights).sum(), A)
    want, = torch.autograd.grad((torch.linalg.inv(eye + A) * weights).sum(), A)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_chunked_gradients_match_the_recurrence():
    """Training differentiates the chunked rule (compiled) or fla; its gradients against the token loop's, float64."""
    inputs = [x.double().requires_grad_() for x in random_inputs(1, 37, 2, 4, 8, 6, True, seed=11)]
    weights = torch.randn(1, 37, 4, 6, dtype=torch.float64)
    grads = []
    for rule in (ref.gated_delta_rule_recurrent, partial(ref.gated_delta_rule_chunked, chunk_size=16)):
        o, state = rule(*inputs)
        grads.append(torch.autograd.grad((o * weights).sum() + state.sum(), inputs))
    for got, want in zip(*grads):
        assert rel(got, want) < 1e-9


def test_chunked_continues_from_state_like_one_call():
    q, k, v, g, b, s = random_inputs(1, 100, 2, 4, 8, 8, True, seed=3)
    o_all, s_all = ref.gated_delta_rule_chunked(q, k, v, g, b, s, chunk_size=16)
    o1, s1 = ref.gated_delta_rule_chunked(q[:, :45], k[:, :45], v[:, :45], g[:, :45], b[:, :45], s, chunk_size=16)
    o2, s2 = ref.gated_delta_rule_chunked(q[:, 45:], k[:, 45:], v[:, 45:], g[:, 45:], b[:, 45:], s1, chunk_size=16)
    assert rel(torch.cat([o1, o2], 1), o_all) < 1e-6 and rel(s2, s_all) < 1e-6


def test_float64_inputs_stay_float64():
    inputs = [x.double() if x is not None else None for x in random_inputs(1, 5, 1, 1, 4, 4, True, seed=1)]
    o, s = ref.gated_delta_rule_chunked(*inputs, chunk_size=4)
    assert o.dtype == s.dtype == torch.float64


def test_causal_conv1d_matches_padded_conv_and_carries_state():
    g = torch.Generator().manual_seed(0)
    B, T, C, W = 2, 13, 10, 4
    x, w = torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g)
    expected = F.silu(F.conv1d(x.transpose(1, 2), w[:, None], padding=W - 1, groups=C)[..., :T]).transpose(1, 2)
    y, state = ref.causal_conv1d(x, w)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(state, x[:, -(W - 1):].transpose(1, 2))
    # Split anywhere (including pieces shorter than the kernel) and carry the state across.
    pieces, st = [], None
    for a, b in ((0, 2), (2, 3), (3, 9), (9, 13)):
        out, st = ref.causal_conv1d(x[:, a:b], w, st)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), expected)
    torch.testing.assert_close(st, state)


def test_conv_train_op_gradients_match_the_reference():
    """nextdeploy::causal_conv1d_train (GPU training's conv, with its own backward op) on the CPU path: output and
    gradients against autograd through reference.causal_conv1d, float64, short and long inputs; and the state the
    dispatch returns beside it (x's last W-1 inputs, zeros before x)."""
    from model.kernels import ops
    g = torch.Generator().manual_seed(4)
    for T in (2, 13):
        x, w = torch.randn(2, T, 10, generator=g, dtype=torch.float64), torch.randn(10, 4, generator=g)
        dy = torch.randn(2, T, 10, generator=g, dtype=torch.float64)
        results = []
        for conv in (lambda a, b: ref.causal_conv1d(a, b)[0], ops.causal_conv1d_train):
            leaves = [x.clone().requires_grad_(), w.double().requires_grad_()]
            y = conv(*leaves)
            results.append([y, *torch.autograd.grad(y, leaves, dy)])
        for got, want in zip(*results):
            assert rel(got, want) < 1e-12
        torch.testing.assert_close(kernels._last_inputs(x, w.double()), ref.causal_conv1d(x, w.double())[1])


@pytest.mark.parametrize("heads", [(2, 2), (2, 6)])
def test_training_projection_layout_matches_the_grouped_one(heads):
    """A training step's DeltaNet layer projects qkvz with its columns ungrouped ([all q | all k | all v | all z]);
    output and every gradient equal those of the checkpoint's grouped layout (the stateful path, from zero
    states), float64."""
    from model.config import preset
    from model.gated_deltanet import GatedDeltaNet
    Hk, Hv = heads
    config = preset("tiny", hidden_size=48, linear_num_key_heads=Hk, linear_num_value_heads=Hv,
                     linear_key_head_dim=8, linear_value_head_dim=16)
    torch.manual_seed(7)
    layer = GatedDeltaNet(config).double()
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    dy = torch.randn(2, 11, 48, dtype=torch.float64)
    params = [x.requires_grad_(), *layer.parameters()]
    results = []
    for states in ({}, dict(conv_state=torch.zeros(2, layer.conv_dim, layer.conv_kernel_size - 1,
                                                   dtype=torch.float64),
                            recurrent_state=torch.zeros(2, Hv, 8, 16, dtype=torch.float64))):
        y = layer(x, **states)
        results.append([y, *torch.autograd.grad(y, params, dy)])
    for got, want in zip(*results):
        assert rel(got, want) < 1e-12


def test_dispatch_uses_reference_on_cpu():
    inputs = random_inputs(1, 20, 2, 2, 8, 8, True, seed=5)
    o, s = kernels.gated_delta_rule(*inputs)
    o_ref, s_ref = ref.gated_delta_rule_chunked(*inputs)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.use_kernels("triton")


def test_decode_attention_reference_is_a_per_query_softmax():
    """reference.decode_attention (the model's masked cache attention) against one softmax per query row, over the
    slots at or before that row's step."""
    g = torch.Generator().manual_seed(3)
    B, Hkv, group, T, D, S = 2, 2, 3, 2, 8, 11
    q = torch.randn(B, Hkv, group * T, D, generator=g, dtype=torch.float64)
    kc = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    vc = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    positions = torch.tensor([[3, 4], [9, 10]])
    got = ref.decode_attention(q, kc, vc, positions)
    for b in range(B):
        for h in range(Hkv):
            for r in range(group * T):
                n = int(positions[b, r % T]) + 1
                weights = torch.softmax(kc[b, h, :n] @ q[b, h, r] / D ** 0.5, dim=0)
                assert torch.allclose(got[b, h, r], weights @ vc[b, h, :n], atol=1e-12)


def test_decode_attention_dispatch_in_exported_graphs():
    """Exported graphs call the nextdeploy::decode_attention op for the shapes its kernel takes (any number of query
    rows: a prefill chunk's too); an ONNX lowering, or heads too wide for the kernel, keep the plain masked
    attention."""
    class Attend(torch.nn.Module):
        def forward(self, q, key_cache, value_cache, positions):
            return kernels.decode_attention(q, key_cache, value_cache, positions)

    def ops_in(rows, head_dim=16, lowering=None):
        args = (torch.randn(2, 2, rows, head_dim), torch.randn(2, 2, 40, head_dim), torch.randn(2, 2, 40, head_dim),
                torch.tensor([[5], [30]]))
        context = kernels.lowered_to(lowering) if lowering else contextlib.nullcontext()
        with context:
            program = torch.export.export(Attend(), args)
        assert torch.allclose(program.module()(*args), ref.decode_attention(*args), atol=1e-6)
        return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}

    assert "nextdeploy.decode_attention.default" in ops_in(4)
    assert "nextdeploy.decode_attention.default" not in ops_in(4, lowering=object())
    assert "nextdeploy.decode_attention.default" in ops_in(64, head_dim=256)      # blocks of 16 rows
    assert "nextdeploy.decode_attention.default" not in ops_in(32, head_dim=512)  # 16 rows pass its registers
