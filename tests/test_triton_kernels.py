"""The project's own Triton kernels against float64 loops, on odd shapes, with fresh random inputs.

On a CUDA machine they run on the GPU (`python -m pytest tests/test_triton_kernels.py -s` prints the errors).
Without one they run on the CPU in Triton's interpreter: interpreter mode is fixed when triton is imported, so a
single test re-runs this file in a subprocess with TRITON_INTERPRET=1, on smaller shapes.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton",
                    reason="the kernels need Triton (installed with torch on CUDA machines, or the dev extra)")

from model.kernels import reference as ref  # noqa: E402
from tests.test_kernels import float64_loop, random_inputs, rel  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
runs_kernels = pytest.mark.skipif(not (CUDA or INTERPRETED),
                                reason="no CUDA device: test_kernels_in_triton_interpreter runs these in a subprocess")
# float32 inputs: the chunked kernel's matrix products run in tf32x3 (about float32); bf16 rounds inputs and outputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.bfloat16]
# 16-bit models' chunked rule multiplies 16-bit operands at K = 128, float32 ones below (launch.chunk_operands);
# CHUNK_CASES hold both.
CHUNK_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

if INTERPRETED:
    # Triton 3.6's interpreter turns scalar arguments into 1-element arrays and calls int() on them for range();
    # NumPy >= 2.4 refuses int() of a 1-d array. Index through .item() instead.
    from triton.runtime import interpreter

    _patch_tensor = interpreter._patch_lang_tensor

    def _patch_tensor_with_item(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
    interpreter._patch_lang_tensor = _patch_tensor_with_item

    # It also multiplies bfloat16 tl.dot operands as their raw 16-bit patterns (a 16x16 product comes out 4e9
    # wrong): convert them to float32 first, as it does its bfloat16 casts.
    import triton.language as tl
    _create_dot = interpreter.InterpreterBuilder.create_dot

    def _create_dot_of_bfloat16(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a, b = (interpreter.TensorHandle(interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
                                             .view("float32").reshape(x.data.shape), tl.float32) for x in (a, b))
        return _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
    interpreter.InterpreterBuilder.create_dot = _create_dot_of_bfloat16


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="runs the kernels directly (CUDA device present)")
def test_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def shapes(cuda_shapes, interpreted_shapes):
    return cuda_shapes if CUDA else interpreted_shapes


def on_device(*tensors, dtype=None):
    return [t.to(DEVICE) if dtype is None or not t.is_floating_point() else t.to(DEVICE, dtype) for t in tensors]


# ---- causal conv1d ------------------------------------------------------------------------------------------


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", shapes([1, 2, 7, 300, 2048], [1, 2, 37]))
@pytest.mark.parametrize("C", shapes([200, 256], [72, 64]))   # with and without a partial channel block
def test_causal_conv1d(T, C, dtype):
    from model.kernels import triton_conv
    g = torch.Generator().manual_seed(T + C)
    x, w, state = torch.randn(3, T, C, generator=g), torch.randn(C, 4, generator=g), torch.randn(3, C, 3, generator=g)
    y, new = triton_conv.causal_conv1d(*on_device(x, w, state, dtype=dtype))
    y64, new64 = ref.causal_conv1d(*(t.to(dtype).double() for t in (x, w, state)))
    print(f"\ncausal conv1d {dtype} T={T}: output rel {rel(y.cpu(), y64):.2e}, state rel {rel(new.cpu(), new64):.2e}")
    assert y.dtype == dtype and new.dtype == dtype
    assert rel(y.cpu(), y64) < TOL[dtype] and rel(new.cpu(), new64) == 0


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", shapes([1, 3, 7, 300, 2048], [1, 3, 70]))
@pytest.mark.parametrize("C", shapes([200, 256], [72, 64]))
def test_causal_conv1d_backward(T, C, dtype):
    """Training's conv gradients (from no state, float32 weights) against autograd through the float64 reference,
    on the same rounded inputs."""
    from model.kernels import triton_conv
    g = torch.Generator().manual_seed(T * C)
    x, dy = (torch.randn(3, T, C, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(C, 4, generator=g) * 0.5
    dx, dw = triton_conv.causal_conv1d_backward(*on_device(x, w, dy))
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    dx64, dw64 = torch.autograd.grad(ref.causal_conv1d(x64, w64)[0], (x64, w64), dy.double())
    print(f"\ncausal conv1d backward {dtype} T={T} C={C}: dx rel {rel(dx.cpu(), dx64):.2e}, "
          f"dweight rel {rel(dw.cpu(), dw64):.2e}")
    assert dx.dtype == dtype and dw.dtype == torch.float32
    assert rel(dx.cpu(), dx64) < TOL[dtype] and rel(dw.cpu(), dw64) < TOL[dtype]
    # x as the first C columns of a wider projection, as training's layer passes it: the same gradients.
    wide = torch.cat([x, torch.randn(3, T, 40, generator=g).to(dtype)], dim=-1)
    dx_wide, dw_wide = triton_conv.causal_conv1d_backward(*on_device(wide[..., :C], w, dy))
    assert dx_wide.is_contiguous() and torch.equal(dx_wide, dx) and torch.equal(dw_wide, dw)


@pytest.mark.skipif(not CUDA, reason="the op's CUDA path (the interpreter runs its backward kernel in "
                    "test_causal_conv1d_backward, and the op's CPU path is tests/test_kernels.py's)")
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_conv1d_train_op(dtype):
    """nextdeploy::causal_conv1d_train as GPU training runs it, eager and compiled: output and gradients against
    autograd through the float64 reference."""
    from model.kernels import ops
    g = torch.Generator().manual_seed(3)
    x, dy = (torch.randn(2, 300, 200, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(200, 4, generator=g) * 0.5

    def run(conv, x, w):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = conv(x, w)
        return [y, *torch.autograd.grad(y, (x, w), dy.to(y))]
    want = run(lambda a, b: ref.causal_conv1d(a, b)[0], x.double(), w.double())
    eager = run(ops.causal_conv1d_train, *on_device(x, w))
    compiled = run(torch.compile(ops.causal_conv1d_train, fullgraph=True, dynamic=False), *on_device(x, w))
    errors = [rel(a.cpu(), b) for got in (eager, compiled) for a, b in zip(got, want)]
    print(f"\ncausal_conv1d_train op {dtype}: y, dx, dweight rel, eager " + ", ".join(f"{e:.2e}" for e in errors[:3])
          + "; compiled " + ", ".join(f"{e:.2e}" for e in errors[3:]))
    assert all(e < TOL[dtype] for e in errors)


@runs_kernels
def test_causal_conv1d_reads_strided_input():
    """The model passes a slice of a wider projection; the kernel must honour its strides."""
    from model.kernels import triton_conv
    wide, w, state = torch.randn(2, 9, 100), torch.randn(40, 4), torch.randn(2, 40, 3)
    y, new = triton_conv.causal_conv1d(*on_device(wide[..., 30:70], w, state))
    y64, new64 = ref.causal_conv1d(wide[..., 30:70].double(), w.double(), state.double())
    assert rel(y.cpu(), y64) < 1e-5 and rel(new.cpu(), new64) == 0


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("T", shapes([1, 7, 2048], [1, 37]))
@pytest.mark.parametrize("heads", shapes([(3, 40, 24), (2, 64, 64)], [(2, 12, 10), (2, 16, 16)]))
def test_causal_conv1d_grouped_reads_the_projection_in_place(heads, T, group, dtype):
    """The conv over a Gated DeltaNet projection's q, k and v columns (grouped by key head, a slice of the wider
    [qkvz | ba] product) equals the conv of their concatenation; the z columns between them are never read. Head
    sizes with and without a channel block that fits inside every q, k and v group (then read as contiguous)."""
    from model.kernels import triton_conv
    g = torch.Generator().manual_seed(T * 10 + group)
    Hk, K, V = heads
    head_cols = 2 * K + 2 * group * V
    C = 2 * Hk * K + Hk * group * V
    wide = torch.randn(2, T, Hk * head_cols + 5, generator=g)
    qkvz = wide[..., :Hk * head_cols]
    w, state = torch.randn(C, 4, generator=g), torch.randn(2, C, 3, generator=g)
    y, new = triton_conv.causal_conv1d_grouped(*on_device(qkvz, w, state, dtype=dtype), Hk, K)
    args64 = [t.to(dtype).double() for t in (qkvz, w, state)]
    y64, new64 = ref.causal_conv1d_grouped(*args64, Hk, K)
    # The reference's conv input is the concatenation the model built from split_projections before.
    q, k, v, *_ = ref.split_projections(args64[0], torch.empty(2, T, 2 * Hk * group), Hk, K, V)
    assert torch.equal(ref.conv_input(args64[0], Hk, K), torch.cat([t.reshape(2, T, -1) for t in (q, k, v)], -1))
    print(f"\ncausal conv1d grouped {dtype} T={T} group={group}: output rel {rel(y.cpu(), y64):.2e}")
    assert y.shape == (2, T, C) and rel(y.cpu(), y64) < TOL[dtype] and rel(new.cpu(), new64) == 0


# ---- chunked gated delta rule -------------------------------------------------------------------------------


CHUNK_CASES = shapes(
    [(1, 1, 1, 128, 128), (2, 7, 2, 64, 64), (1, 64, 3, 128, 128), (2, 300, 2, 64, 64), (1, 2048, 1, 128, 128),
     (1, 300, 3, 48, 80), (1, 131, 2, 32, 16)],
    [(1, 1, 1, 32, 16), (2, 7, 2, 16, 32), (1, 70, 3, 32, 32), (1, 131, 1, 16, 16), (1, 70, 1, 128, 64)])


@runs_kernels
@pytest.mark.parametrize("dtype", CHUNK_DTYPES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,T,group,K,V", CHUNK_CASES)
def test_chunked_gated_delta_rule(B, T, group, K, V, with_state, dtype):
    from model.kernels import triton_chunk
    Hk = 2
    q, k, v, g, beta, state = random_inputs(B, T, Hk, Hk * group, K, V, with_state, seed=T + K + group)
    if state is None:
        state = torch.zeros(B, Hk * group, K, V)
    o, s = triton_chunk.gated_delta_rule(*on_device(q, k, v, dtype=dtype), *on_device(g, beta, state))
    o64, s64 = float64_loop(*(t.to(dtype) if t.is_floating_point() and t.dim() == 4 else t for t in (q, k, v)),
                            g, beta, state)
    eo, es = rel(o.cpu(), o64), rel(s.cpu(), s64)
    print(f"\nchunked gated delta rule {dtype} B={B} T={T} GVA={group} K={K} V={V} state={with_state}: "
          f"output rel {eo:.2e}, state rel {es:.2e}")
    assert o.dtype == dtype and s.dtype == torch.float32
    assert eo < TOL[dtype] and es < TOL[dtype]


@runs_kernels
def test_chunked_gated_delta_rule_reads_strided_views():
    """q, k, v are views into the conv output in the model: strides other than the contiguous ones."""
    from model.kernels import triton_chunk
    B, T, Hk, Hv, K, V = 2, 19, 2, 4, 16, 16
    mixed = torch.randn(B, T, 2 * Hk * K + Hv * V)
    q, k, v = (t.reshape(B, T, -1, d) for t, d in zip(mixed.split([Hk * K, Hk * K, Hv * V], dim=-1), (K, K, V)))
    _, _, _, g, beta, state = random_inputs(B, T, Hk, Hv, K, V, True, seed=5)
    o, s = triton_chunk.gated_delta_rule(*on_device(q, k, v, g, beta, state))
    o64, s64 = float64_loop(q, k, v, g, beta, state)
    assert rel(o.cpu(), o64) < 1e-4 and rel(s.cpu(), s64) < 1e-4


@runs_kernels
def test_chunked_gated_delta_rule_keeps_bfloat16_range():
    """A bfloat16 model's values and state may pass float16's largest number (65504): the products that carry them
    take bfloat16 operands (launch.chunk_operands), so nothing overflows."""
    from model.kernels import triton_chunk
    B, T, Hk, Hv, K, V = 1, 131, 2, 4, 128, 64
    q, k, v, g, beta, state = random_inputs(B, T, Hk, Hv, K, V, True, seed=13)
    v, state = v * 1e6, state * 1e6
    o, s = triton_chunk.gated_delta_rule(*on_device(q, k, v, dtype=torch.bfloat16), *on_device(g, beta, state))
    o64, s64 = float64_loop(*(t.to(torch.bfloat16) for t in (q, k, v)), g, beta, state)
    assert rel(o.cpu(), o64) < TOL[torch.bfloat16] and rel(s.cpu(), s64) < TOL[torch.bfloat16]


@runs_kernels
@pytest.mark.parametrize("keys", ["repeated", "nearly repeated"])
def test_chunked_gated_delta_rule_on_repeated_keys(keys):
    """Every key (nearly) the same, beta 1, (almost) no decay: each chunk's triangular system is as far from the
    identity as it gets (its inverse's Neumann terms grow like binomial coefficients), where a solve that sums
    those terms loses float32 accuracy (state 1.6e-4 from float64) and the block inversion does not (5e-7)."""
    from model.kernels import triton_chunk
    B, T, H, K, V = 1, 131, 2, 32, 16
    q, k, v, _, _, state = random_inputs(B, T, H, H, K, V, True, seed=11)
    k = k[:, :1, :1].expand(B, T, H, K) + (0.0 if keys == "repeated" else 0.3) * k
    g = torch.zeros(B, T, H) if keys == "repeated" else torch.full((B, T, H), -0.01)
    beta = torch.ones(B, T, H)
    o, s = triton_chunk.gated_delta_rule(*on_device(q, k.contiguous(), v, g, beta, state))
    o64, s64 = float64_loop(q, k, v, g, beta, state)
    assert rel(o.cpu(), o64) < TOL[torch.float32] and rel(s.cpu(), s64) < TOL[torch.float32]


# ---- the chunked rule's training scan ------------------------------------------------------------------------


def scan_inputs(B, T, Hv, K, V, seed):
    """chunk_scan's inputs as the chunked rule builds them from random q, k, v, g, beta and state, in float64."""
    captured = []

    def capture(*args):
        captured.extend(args)
        return ref.chunk_scan(*args)
    inputs = random_inputs(B, T, 2, Hv, K, V, True, seed)
    ref.gated_delta_rule_chunked(*(t.double() for t in inputs), scan=capture)
    return captured


# The last: enough batch rows and heads for the whole of V per program (launch.training_scan_launch).
SCAN_CASES = shapes([(2, 300, 4, 128, 128), (1, 64, 2, 64, 64), (3, 131, 2, 128, 64), (1, 2048, 2, 128, 128),
                     (8, 200, 16, 128, 128)],
                    [(1, 70, 2, 128, 16), (2, 131, 2, 32, 32)])


@runs_kernels
@pytest.mark.parametrize("dtype", CHUNK_DTYPES)
@pytest.mark.parametrize("B,T,Hv,K,V", SCAN_CASES)
def test_chunk_scan_forward_and_backward(B, T, Hv, K, V, dtype):
    """Both training scan kernels against reference.chunk_scan / chunk_scan_backward in float64 on the same
    (rounded) inputs: y, the kept states and the final state; the writes' gradient, the end states' and the
    first state's."""
    from model.kernels import triton_chunk_train
    writes, terms, decay, state = scan_inputs(B, T, Hv, K, V, seed=T + K)
    writes, terms = writes.to(dtype), terms.to(dtype)
    gen = torch.Generator().manual_seed(T)
    dy, d_final = torch.randn(writes.shape, generator=gen).to(dtype), torch.randn(state.shape, generator=gen)
    got = triton_chunk_train.chunk_scan(*on_device(writes, terms, decay.float(), state.float()))
    got += triton_chunk_train.chunk_scan_backward(*on_device(dy, terms, decay.float(), d_final))
    want = ref.chunk_scan(writes.double(), terms.double(), decay, state)
    want += ref.chunk_scan_backward(dy.double(), terms.double(), decay, d_final.double())
    errors = [rel(a.cpu(), b) for a, b in zip(got, want)]
    print(f"\nchunk scan {dtype} B={B} T={T} Hv={Hv} K={K} V={V}: y, states, final, d_writes, d_ends, d_state rel "
          + ", ".join(f"{e:.2e}" for e in errors))
    assert [t.dtype for t in got] == [dtype, torch.float32, torch.float32, dtype, torch.float32, torch.float32]
    assert all(e < TOL[dtype] for e in errors)


def rule_gradients(rule, tensors, weights):
    """rule's (o, final state) and the gradients of a weighted sum of both with respect to every input."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    o, s = rule(*leaves)
    loss = (o.double() * weights[0].to(o.device)).sum() + (s.double() * weights[1].to(s.device)).sum()
    return [o, s, *torch.autograd.grad(loss, leaves)]


def rule_inputs(B, T, Hk, Hv, K, V, dtype):
    """Random inputs of the rule (q, k, v in dtype, the rest float32; an initial state) and of its loss's weights,
    and the float64 inputs they round to."""
    inputs = random_inputs(B, T, Hk, Hv, K, V, True, seed=T + Hv + K)
    rounded = [t.to(dtype if t.dim() == 4 and t is not inputs[5] else torch.float32) for t in inputs]
    weights = [torch.randn(B, T, Hv, V, dtype=torch.float64), torch.randn(B, Hv, K, V, dtype=torch.float64)]
    return rounded, [t.double() for t in rounded], weights


# The second CUDA case: every value head its own key head, T neither a whole chunk nor one.
TRAIN_RULE_CASES = shapes([(2, 300, 2, 4, 128, 128), (1, 131, 1, 1, 64, 64), (3, 200, 2, 6, 128, 64)],
                          [(1, 70, 2, 4, 32, 32), (2, 131, 1, 3, 32, 64), (1, 64, 2, 2, 64, 16)])


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hk,Hv,K,V", TRAIN_RULE_CASES)
def test_training_rule_kernels_forward_and_backward(B, T, Hk, Hv, K, V, dtype):
    """Training's chunked rule (triton_chunk_train: the solve and scan forward; the reverse scan,
    chunk_values_backward_kernel and chunk_keys_backward_kernel backward) against autograd through the float64
    recurrence: o, the final state and the gradients of q, k, v, g, beta and the initial state."""
    from model.kernels import triton_chunk_train
    rounded, exact, weights = rule_inputs(B, T, Hk, Hv, K, V, dtype)
    o, final, *saved = triton_chunk_train.gated_delta_rule_forward(*on_device(*rounded))
    d_o, d_final = (w.float() for w in weights)
    grads = triton_chunk_train.gated_delta_rule_backward(*on_device(*rounded[:5]), *saved,
                                                         *on_device(d_o.to(dtype), d_final))
    got = [o, final, *grads]
    want = rule_gradients(ref.gated_delta_rule_recurrent, exact, [d_o.to(dtype).double(), weights[1]])
    errors = [rel(a.cpu(), b) for a, b in zip(got, want)]
    print(f"\ntraining rule kernels {dtype} B={B} T={T} Hk={Hk} Hv={Hv} K={K} V={V}: o, state, d q, k, v, g, beta, "
          "state rel " + ", ".join(f"{e:.2e}" for e in errors))
    assert [t.dtype for t in got] == [dtype, torch.float32, dtype, dtype, dtype, torch.float32, torch.float32,
                                      torch.float32]
    assert all(e < 2 * TOL[dtype] for e in errors)


@runs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hk,Hv,K,V", shapes([(2, 300, 2, 4, 128, 128), (1, 131, 1, 2, 64, 64)],
                                                  [(1, 70, 2, 4, 32, 32)]))
def test_training_rule_op_trains_the_rule(B, T, Hk, Hv, K, V, dtype):
    """nextdeploy::gated_delta_rule_train with its autograd formula, as GPU training runs it (eagerly, and on CUDA
    compiled too): outputs and every input's gradient against autograd through the float64 recurrence."""
    from model.kernels import ops
    rounded, exact, weights = rule_inputs(B, T, Hk, Hv, K, V, dtype)

    def rule(*tensors):
        return ops.gated_delta_rule_train(*tensors)[:2]
    on_device_ = on_device(*rounded)
    got = rule_gradients(rule, on_device_, weights)
    want = rule_gradients(ref.gated_delta_rule_recurrent, exact, weights)
    errors = [rel(a.cpu(), b) for a, b in zip(got, want)]
    if CUDA:   # Inductor runs Triton kernels on CUDA only
        compiled = rule_gradients(torch.compile(rule, fullgraph=True, dynamic=False), on_device_, weights)
        errors += [rel(a.cpu(), b.cpu()) for a, b in zip(compiled, got)]
    print(f"\ntraining rule op, {dtype} B={B} T={T} K={K} V={V}: o, state, d q, k, v, g, beta, state rel "
          + ", ".join(f"{e:.2e}" for e in errors[:8]) + "; compiled against eager "
          + ", ".join(f"{e:.2e}" for e in errors[8:]))
    assert all(e < 2 * TOL[dtype] for e in errors)


# ---- fused decode step --------------------------------------------------------------------------------------


def decode_inputs(B, T, Hk, group, K, V, pool, seed):
    g = torch.Generator().manual_seed(seed)
    Hv = Hk * group
    conv_dim = 2 * Hk * K + Hv * V
    return dict(
        qkvz=torch.randn(B, T, Hk * (2 * K + 2 * group * V), generator=g),
        ba=torch.randn(B, T, 2 * Hv, generator=g),
        conv_weight=torch.randn(conv_dim, 4, generator=g) * 0.5,
        A_log=torch.rand(Hv, generator=g).log(),
        dt_bias=torch.randn(Hv, generator=g),
        norm_weight=1 + 0.1 * torch.randn(V, generator=g),
        conv_state=torch.randn(pool, conv_dim, 3, generator=g),
        recurrent_state=torch.randn(pool, Hv, K, V, generator=g) * 0.1)


DECODE_CASES = shapes(
    # (batch, steps, key heads, GVA, K, V, pool rows, slots: a negative one is a padding row; None: rows 0..B-1,
    # as the model calls it)
    [(1, 1, 16, 2, 128, 128, 3, [1]), (4, 1, 4, 1, 64, 64, 6, [5, -1, 0, 2]), (3, 1, 3, 3, 64, 64, 3, [2, 0, 1]),
     (2, 4, 2, 2, 128, 128, 2, [1, 0]), (5, 1, 2, 2, 48, 80, 8, [7, -1, -1, 1, 3]), (3, 2, 2, 2, 64, 64, 3, None)],
    [(1, 1, 2, 1, 16, 32, 3, [1]), (4, 1, 2, 2, 32, 16, 6, [5, -1, 0, 2]), (2, 3, 1, 3, 16, 16, 2, [1, 0]),
     (3, 1, 2, 2, 16, 16, 3, None)])


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hk,group,K,V,pool,slots", DECODE_CASES)
def test_fused_decode_step(B, T, Hk, group, K, V, pool, slots, dtype):
    from model.kernels import triton_decode
    inputs = decode_inputs(B, T, Hk, group, K, V, pool, seed=B * 7 + K)
    given = None if slots is None else torch.tensor(slots, dtype=torch.int32)
    slots = torch.arange(B, dtype=torch.int32) if slots is None else given
    # Inputs rounded to the dtype first, so the float64 reference sees exactly what the kernel sees.
    rounded = {n: t.to(dtype) if n != "recurrent_state" else t for n, t in inputs.items()}
    expected = {n: t.double() for n, t in rounded.items()}
    o64 = ref.gated_deltanet_decode(**expected, slots=slots, eps=1e-6)
    got = {n: t.to(DEVICE) for n, t in rounded.items()}
    before = {n: got[n].clone() for n in ("conv_state", "recurrent_state")}
    o = triton_decode.gated_deltanet_decode(**got, slots=None if given is None else given.to(DEVICE), eps=1e-6)
    errors = (rel(o.cpu(), o64), rel(got["conv_state"].cpu(), expected["conv_state"]),
              rel(got["recurrent_state"].cpu(), expected["recurrent_state"]))
    print(f"\nfused decode {dtype} B={B} T={T} Hk={Hk} GVA={group} K={K} V={V}: output rel {errors[0]:.2e}, "
          f"conv state rel {errors[1]:.2e}, recurrent state rel {errors[2]:.2e}")
    assert o.dtype == dtype and max(errors) < TOL[dtype]
    assert (o[slots.to(DEVICE) < 0] == 0).all()
    for p in set(range(pool)) - set(slots.tolist()):      # pool rows no live slot names: bit for bit unchanged
        for n in before:
            assert torch.equal(got[n][p], before[n][p])


# ---- decode attention over the slots in use -----------------------------------------------------------------

ATTENTION_CASES = shapes(
    # (batch, KV heads, query heads per KV head, steps, head dim, cache slots, first position of each row)
    [(1, 2, 4, 1, 256, 8448, [127]), (32, 2, 4, 1, 256, 1024, list(range(0, 1024, 33))[:32]),
     (3, 1, 4, 1, 64, 4096, [0, 4095, 700]), (2, 2, 2, 3, 128, 777, [5, 600]),
     (5, 4, 1, 1, 80, 300, [1, 2, 3, 250, 299]),
     # prefill chunks written into the cache: more query rows than one program holds, in blocks
     (1, 2, 4, 300, 256, 2048, [700]), (2, 2, 8, 128, 128, 4096, [0, 3000]), (1, 4, 2, 77, 64, 1000, [500]),
     # from launch.PREFILL_ATTENTION_ROWS rows a KV head: prefill's blocks, split and not (the last)
     (1, 2, 4, 600, 256, 1000, [300]), (2, 1, 8, 300, 64, 4096, [0, 3700]), (1, 1, 8, 256, 128, 256, [0])],
    [(2, 2, 4, 1, 64, 300, [1, 104]), (3, 1, 3, 2, 48, 130, [3, 12, 98]), (1, 1, 2, 3, 16, 4096, [5]),
     (2, 2, 2, 1, 32, 200, [0, 199]), (1, 1, 2, 40, 64, 1100, [900]), (2, 1, 3, 11, 128, 150, [0, 120]),
     (1, 1, 8, 2, 128, 2600, [2500]),   # 10 live splits of 11, combined 8 per load: two loads
     (1, 1, 2, 1024, 16, 1100, [50]), (1, 1, 8, 256, 16, 256, [0])])   # prefill's blocks, split and not


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hkv,group,T,D,S,first", ATTENTION_CASES)
def test_decode_attention(B, Hkv, group, T, D, S, first, dtype):
    """Against the model's own masked attention over the whole cache, in float64. Slots past a row's position hold
    random values, which must not leak in."""
    from model.kernels import triton_attention
    g = torch.Generator().manual_seed(B * 31 + D + S)
    q = torch.randn(B, Hkv, group * T, D, generator=g)
    key_cache, value_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    positions = torch.tensor([[min(p + t, S - 1) for t in range(T)] for p in first])
    rounded = [t.to(dtype) for t in (q, key_cache, value_cache)]
    want = ref.decode_attention(*(t.double() for t in rounded), positions)
    got = triton_attention.decode_attention(*on_device(*rounded), positions.to(DEVICE))
    err = rel(got.cpu(), want)
    print(f"\ndecode attention {dtype} B={B} Hkv={Hkv} group={group} T={T} D={D} S={S}: rel {err:.2e}")
    assert got.dtype == dtype and got.shape == q.shape and err < TOL[dtype]


# ---- fused linear (a few rows' projection with its norm / SwiGLU and residual) ---------------------------------

LINEAR_CASES = shapes(
    # (rows, K, N): tiny's and small's decode products (qkvz+ba, down, LM head), odd sizes; rows in programs of up
    # to 8, so more than 8 take two blocks of rows
    [(1, 256, 1032), (8, 768, 256), (1, 1024, 6176), (8, 3584, 1024), (3, 1024, 32768), (5, 300, 77),
     (12, 1024, 300)],
    [(1, 256, 1032), (3, 300, 77), (2, 48, 9), (8, 130, 2100), (11, 64, 40)])   # (8, 130, ...): K in 3 blocks


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue", ["none", "norm", "swiglu"])
@pytest.mark.parametrize("rows,K,N", LINEAR_CASES)
def test_fused_linear(rows, K, N, prologue, dtype):
    """Against the float64 reference: prologue, product, bias and residual, on odd sizes. The input is a strided
    view (a slice of a wider product, as the projections' outputs are), the gate and up halves views of one."""
    from model.kernels import triton_linear
    g = torch.Generator().manual_seed(rows * 7 + K + N)
    wide = torch.randn(rows, 2 * K + 3, generator=g)
    x, up = wide[:, 1:K + 1], wide[:, K + 2:2 * K + 2]
    weight, bias = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    residual, norm_weight = torch.randn(rows, N, generator=g), torch.randn(K, generator=g) * 0.1
    extra = {"norm": {"norm_weight": norm_weight}, "swiglu": {"up": up}, "none": {}}[prologue]
    for with_bias, with_residual, float_output in [(False, False, False), (True, True, True)]:
        args = dict(extra, bias=bias if with_bias else None, residual=residual if with_residual else None)
        rounded = {k: v.to(dtype) if k != "norm_weight" else v for k, v in args.items() if v is not None}
        want = ref.fused_linear(x.to(dtype).double(), weight.to(dtype).double(),
                                **{k: v.double() for k, v in rounded.items()}, eps=1e-6)
        got = triton_linear.fused_linear(*on_device(x.to(dtype), weight.to(dtype)), eps=1e-6,
                                         float_output=float_output, **{k: on_device(v)[0] for k, v in rounded.items()})
        err = rel(got.cpu(), want)
        print(f"\nfused linear {dtype} rows={rows} K={K} N={N} {prologue} bias={with_bias} residual={with_residual} "
              f"float output={float_output}: rel {err:.2e}")
        assert got.dtype == (torch.float32 if float_output else dtype) and got.shape == (rows, N)
        assert err < TOL[dtype]


# ---- a cached attention layer's q/k norms, rotary embedding and cache writes ------------------------------------

ROPE_CASES = shapes(
    # (batch, steps, query heads, KV heads, head dim, rotary channels, cache slots)
    [(1, 1, 4, 1, 64, 16, 4096), (32, 1, 8, 2, 256, 64, 8448), (3, 4, 16, 2, 256, 64, 300), (2, 1, 6, 3, 80, 20, 97)],
    [(1, 1, 4, 1, 64, 16, 300), (3, 2, 6, 3, 80, 20, 97), (2, 1, 2, 2, 48, 0, 40)])


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,Hkv,D,rot,S", ROPE_CASES)
def test_norm_rope_cache(B, T, H, Hkv, D, rot, S, dtype):
    """Against the float64 reference: the queries returned, and the caches written at each row's positions and
    nowhere else. q, k and v are views of one projection's output, as in the model (q interleaved with its gate)."""
    from model.kernels import triton_rope_cache
    g = torch.Generator().manual_seed(B * 13 + D + S)
    qkv = torch.randn(B, T, H * 2 * D + 2 * Hkv * D, generator=g).to(dtype)
    q = qkv[..., :H * 2 * D].view(B, T, H, 2 * D)[..., :D]
    k = qkv[..., H * 2 * D:H * 2 * D + Hkv * D].view(B, T, Hkv, D)
    v = qkv[..., H * 2 * D + Hkv * D:].view(B, T, Hkv, D)
    q_norm_weight, k_norm_weight = torch.randn(D, generator=g) * 0.1, torch.randn(D, generator=g) * 0.1
    angles = torch.rand(B, T, rot // 2, generator=g) * 6.0
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    first = torch.randint(0, S - T, (B,), generator=g)
    positions = first[:, None] + torch.arange(T)
    caches = [torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2)]
    want_caches = [c.double() for c in caches]
    want = ref.norm_rope_cache(q.double(), k.double(), v.double(), q_norm_weight.double(), k_norm_weight.double(),
                               cos.double(), sin.double(), positions, *want_caches, 1e-6)
    got_caches = on_device(*caches)
    got = triton_rope_cache.norm_rope_cache(*on_device(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions),
                                            *got_caches, 1e-6)
    err = rel(got.cpu(), want)
    cache_err = max(rel(c.cpu(), w) for c, w in zip(got_caches, want_caches))
    untouched = torch.ones(B, S, dtype=torch.bool)
    untouched[torch.arange(B)[:, None], positions] = False
    unchanged = all(torch.equal(c.cpu().transpose(1, 2)[untouched], o.transpose(1, 2)[untouched])
                    for c, o in zip(got_caches, caches))
    print(f"\nnorm rope cache {dtype} B={B} T={T} H={H} Hkv={Hkv} D={D} rot={rot}: q rel {err:.2e}, "
          f"caches rel {cache_err:.2e}")
    assert got.dtype == dtype and got.shape == (B, Hkv, H // Hkv * T, D) and unchanged
    assert err < TOL[dtype] and cache_err < TOL[dtype]
