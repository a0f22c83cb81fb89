"""The TensorRT plugins' kernels, launched as TensorRT would launch them, against float64 references on odd shapes.

Every launch here takes its grid, int32 arguments and constants from `Plugin.launch`, the function aot_impl hands
TensorRT (plugins/register.py). On a CUDA machine `test_ptx_*` load the very PTX aot_impl returns with CuPy and
launch it with aot_impl's grid, block and shared memory, null for Triton's scratch pointers as TensorRT passes them
(`python -m pytest -q -s tests/test_plugin_kernels.py` prints the errors; bench/gpu_check_tensorrt.sh runs it), and
the Triton entries run as Triton kernels. Without a GPU the entries run in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, smaller shapes): the calling convention, strides and launch arithmetic, not the PTX.
Past and present state are tested both as one buffer (how the runtime binds them) and as two.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the plugins' kernels are Triton kernels (dev extra on Linux x86-64)")

from model.kernels import reference as ref  # noqa: E402
from plugins import PLUGINS  # noqa: E402
from tests.test_kernels import chunk_terms64, float64_loop, random_inputs, rel  # noqa: E402
from tests.test_triton_kernels import INTERPRETED, TOL, decode_inputs  # noqa: E402

CUDA = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if CUDA else "cpu"
runs_entries = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="no CUDA device: "
                                  "test_plugin_kernels_in_triton_interpreter runs these in a subprocess")
needs_gpu = pytest.mark.skipif(not CUDA, reason="no CUDA device: the PTX is launched on the GPU "
                                                "(bench/gpu_check_tensorrt.sh)")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.int32: "int32"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="runs the kernels directly (CUDA device present)")
def test_plugin_kernels_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                             "entry"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def shapes(cuda_shapes, interpreted_shapes):
    return cuda_shapes if CUDA else interpreted_shapes


# ---- launching a plugin's kernel as TensorRT would --------------------------------------------------------------

def output_buffers(name, inputs, alias=True):
    """The plugin's outputs; with `alias`, an output that may share its input's buffer is that input."""
    plugin = PLUGINS[name]
    dims = plugin.bind([tuple(t.shape) for t in inputs])
    _, dtypes = plugin.dtypes(DTYPE_NAMES[inputs[0].dtype])
    by_name = {t.name: x for t, x in zip(plugin.inputs, inputs)}
    return [by_name[plugin.in_place[t.name]] if alias and t.name in plugin.in_place else
            torch.full(shape, float("nan"), dtype=TORCH_DTYPES[d], device=inputs[0].device)
            for t, shape, d in zip(plugin.outputs, plugin.output_shapes(dims), dtypes)]


def launch_entry(name, inputs, outputs, attrs=None):
    """The plugin's Triton entry with aot_impl's grid, int32 arguments and constants (Triton's own launcher)."""
    from plugins.kernels import ENTRIES
    plugin = PLUGINS[name]
    launch = plugin.launch([tuple(t.shape) for t in inputs], [DTYPE_NAMES[t.dtype] for t in inputs], attrs)
    ENTRIES[plugin.kernel][launch.grid](*inputs, *launch.args, *outputs, **launch.constexprs,
                                        num_warps=launch.num_warps, num_stages=launch.num_stages)


def launch_ptx(name, inputs, outputs, attrs=None):
    """The PTX aot_impl returns, loaded with CuPy and launched with aot_impl's grid, block, shared memory and int32
    arguments; TensorRT's calling convention: inputs, int32 arguments, outputs, then null for the rest."""
    cupy = pytest.importorskip("cupy", reason="launches the PTX outside TensorRT (CuPy is on the GPU machine)")
    from plugins.kernels import aot_kernel, ptx_parameters
    plugin = PLUGINS[name]
    k = aot_kernel(plugin, [tuple(t.shape) for t in inputs], [DTYPE_NAMES[t.dtype] for t in inputs], attrs)
    params = ptx_parameters(k.ptx, k.name)
    args = [np.uint64(t.data_ptr()) for t in inputs] + [np.int32(a) for a in k.args] + \
        [np.uint64(t.data_ptr()) for t in outputs]
    assert params[:len(args)] == ["u64"] * len(inputs) + ["u32"] * len(k.args) + ["u64"] * len(outputs)
    assert all(p == "u64" for p in params[len(args):]), params     # Triton's scratch pointers, null from TensorRT
    args += [np.uint64(0)] * (len(params) - len(args))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.ptx)
    try:
        kernel = cupy.RawModule(path=f.name).get_function(k.name)
    finally:
        os.unlink(f.name)
    if k.shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = k.shared_mem
    torch.cuda.synchronize()
    kernel(tuple(int(g) for g in k.grid), k.block, tuple(args), shared_mem=k.shared_mem)
    cupy.cuda.Device().synchronize()


LAUNCHERS = {"entry": launch_entry, "ptx": launch_ptx}
LAUNCH = [pytest.param("entry", marks=runs_entries), pytest.param("ptx", marks=needs_gpu)]


def report(what, errors):
    """Print the errors (-s), and append them to $PLUGIN_ERRORS_FILE (bench/gpu_check_tensorrt.sh's table)."""
    line = f"{what}: " + ", ".join(f"{n} rel {e:.2e}" for n, e in errors.items())
    print("\n" + line)
    if os.environ.get("PLUGIN_ERRORS_FILE"):
        with open(os.environ["PLUGIN_ERRORS_FILE"], "a") as f:
            f.write(line + "\n")


# ---- causal conv1d ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", LAUNCH)
@pytest.mark.parametrize("alias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", shapes([2, 37, 300], [2, 37, 70]))
def test_causal_conv1d_plugin(how, T, dtype, alias):
    g = torch.Generator().manual_seed(T)
    C = 200 if CUDA else 72
    x, w, state = torch.randn(3, T, C, generator=g), torch.randn(C, 4, generator=g), torch.randn(3, C, 3, generator=g)
    inputs = [t.to(DEVICE, dtype).clone() for t in (x, w, state)]
    y64, new64 = ref.causal_conv1d(*(t.cpu().double() for t in inputs))
    outputs = output_buffers("causal_conv1d", inputs, alias)
    LAUNCHERS[how]("causal_conv1d", inputs, outputs)
    errors = {"output": rel(outputs[0].cpu(), y64), "state": rel(outputs[1].cpu(), new64)}
    report(f"causal_conv1d {how} {dtype} T={T} past {'=' if alias else '!='} present", errors)
    assert errors["output"] < TOL[dtype] and errors["state"] == 0


# ---- the chunked gated delta rule: solve, then scan --------------------------------------------------------------

CHUNK_CASES = shapes(
    [(2, 131, 2, 2, 64, 64), (1, 300, 1, 3, 128, 128), (2, 70, 2, 1, 48, 80), (1, 1, 2, 2, 128, 128)],
    [(1, 70, 2, 2, 16, 16), (2, 19, 1, 3, 32, 16), (1, 65, 1, 2, 24, 20)])


@pytest.mark.parametrize("how", LAUNCH)
@pytest.mark.parametrize("alias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hk,group,K,V", CHUNK_CASES)
def test_gated_delta_rule_plugins(how, B, T, Hk, group, K, V, dtype, alias):
    q, k, v, g, beta, state = random_inputs(B, T, Hk, Hk * group, K, V, True, seed=T + K + group)
    q, k, v, beta = (t.to(dtype) for t in (q, k, v, beta))      # the model's dtype; g and the state stay float32
    o64, s64 = float64_loop(q, k, v, g, beta, state)
    u64, decay64 = chunk_terms64(q, k, v, g, beta)
    dev = lambda *ts: [t.to(DEVICE).clone() for t in ts]  # noqa: E731
    solve_in = dev(q, k, v, g, beta)
    solved = output_buffers("gated_delta_rule_solve", solve_in)      # NaN-filled: every element must be written
    LAUNCHERS[how]("gated_delta_rule_solve", solve_in, solved)
    scan_in = dev(*solved, state)
    out = output_buffers("gated_delta_rule_scan", scan_in, alias)
    LAUNCHERS[how]("gated_delta_rule_scan", scan_in, out)
    o = out[0].cpu()
    errors = {"u": rel(solved[0].cpu(), u64), "decay": rel(solved[1].cpu(), decay64), "output": rel(o[:, :T], o64),
              "state": rel(out[1].cpu(), s64)}
    report(f"gated_delta_rule {how} {dtype} B={B} T={T} GVA={group} K={K} V={V} past {'=' if alias else '!='} "
           "present", errors)
    assert all(t.dtype == torch.float32 for t in (*solved, *out))
    assert max(errors.values()) < TOL[dtype]
    assert (o[:, T:] == 0).all(), "steps past T of the whole chunks come out zero"


# ---- the fused decode step --------------------------------------------------------------------------------------

DECODE_CASES = shapes(
    # (batch, steps, key heads, GVA, K, V, pool rows, slots: a negative one is a padding row)
    [(3, 1, 2, 2, 64, 64, 5, [4, -1, 1]), (2, 1, 16, 2, 128, 128, 2, [1, 0]), (2, 3, 2, 2, 64, 64, 2, [0, 1]),
     (4, 1, 3, 3, 64, 64, 4, [3, 2, 1, 0])],
    [(4, 1, 2, 2, 32, 16, 6, [5, -1, 0, 2]), (2, 3, 1, 3, 16, 16, 2, [1, 0])])


@pytest.mark.parametrize("how", LAUNCH)
@pytest.mark.parametrize("alias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,Hk,group,K,V,pool,slots", DECODE_CASES)
def test_gated_deltanet_decode_plugin(how, B, T, Hk, group, K, V, pool, slots, dtype, alias):
    plugin = PLUGINS["gated_deltanet_decode"]
    raw = decode_inputs(B, T, Hk, group, K, V, pool, seed=B * 7 + K)
    rounded = {n: t.to(dtype) if n != "recurrent_state" else t for n, t in raw.items()}
    slots = torch.tensor(slots, dtype=torch.int32)
    expected = {n: t.double() for n, t in rounded.items()}
    o64 = ref.gated_deltanet_decode(**expected, slots=slots, eps=1e-6)
    given = {**rounded, "slots": slots, "arrivals": torch.zeros(B, Hk, dtype=torch.int32)}
    inputs = [given[t.name].to(DEVICE) for t in plugin.inputs]
    before = [t.clone() for t in inputs[6:8]]
    outputs = output_buffers("gated_deltanet_decode", inputs, alias)
    LAUNCHERS[how]("gated_deltanet_decode", inputs, outputs, {"eps": 1e-6})
    live = slots[slots >= 0].long()
    errors = {"output": rel(outputs[0].cpu(), o64),
              "conv state": rel(outputs[1].cpu()[live], expected["conv_state"][live]),
              "recurrent state": rel(outputs[2].cpu()[live], expected["recurrent_state"][live])}
    report(f"gated_deltanet_decode {how} {dtype} B={B} T={T} Hk={Hk} GVA={group} K={K} V={V} past "
           f"{'=' if alias else '!='} present", errors)
    assert max(errors.values()) < TOL[dtype]
    assert (outputs[0][slots.to(DEVICE) < 0] == 0).all()
    assert (inputs[9] == 0).all(), "the kernel leaves its arrival counters zero for the next launch"
    untouched = sorted(set(range(pool)) - set(slots.tolist()))
    for past, present, old in zip(inputs[6:8], outputs[1:], before):
        if alias:       # one buffer: rows no live slot names stay as they were
            assert torch.equal(present[untouched], old[untouched])
        else:           # two buffers: the past is only read
            assert torch.equal(past, old)


@pytest.mark.parametrize("how", LAUNCH)
def test_decode_plugin_steps_reuse_one_arrivals_buffer(how):
    """TensorRT feeds every DeltaNet layer the same zero-filled arrivals tensor: each launch must leave it zero."""
    plugin = PLUGINS["gated_deltanet_decode"]
    B, Hk, group, K, V = (3, 2, 2, 64, 64) if CUDA else (2, 2, 2, 16, 16)
    raw = decode_inputs(B, 1, Hk, group, K, V, B, seed=11)
    expected = {n: t.double() for n, t in raw.items()}
    slots = torch.arange(B, dtype=torch.int32)
    given = {**raw, "slots": slots, "arrivals": torch.zeros(B, Hk, dtype=torch.int32)}
    inputs = [given[t.name].to(DEVICE) for t in plugin.inputs]
    for step in range(3):
        qkvz = torch.randn(B, 1, raw["qkvz"].shape[-1], generator=torch.Generator().manual_seed(step))
        inputs[0] = qkvz.to(DEVICE)
        o64 = ref.gated_deltanet_decode(qkvz.double(), *(expected[n] for n in ("ba", "conv_weight", "A_log",
                                        "dt_bias", "norm_weight", "conv_state", "recurrent_state")), slots, 1e-6)
        outputs = output_buffers("gated_deltanet_decode", inputs)
        LAUNCHERS[how]("gated_deltanet_decode", inputs, outputs, {"eps": 1e-6})
        assert rel(outputs[0].cpu(), o64) < 1e-4 and rel(inputs[7].cpu(), expected["recurrent_state"]) < 1e-4


# ---- the PTX aot_impl returns, compiled here for the H100 ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="compiles PTX (not under the interpreter)")
@pytest.mark.parametrize("dtype,K", [("float32", 64), ("bfloat16", 64), ("float32", 128), ("bfloat16", 128)])
def test_ptx_follows_the_calling_convention(dtype, K):
    """Parameters: input pointers, int32 arguments, output pointers, then Triton's scratch pointers (null from
    TensorRT); shared memory within an H100's; the grid as aot_impl computes it."""
    from triton.backends.compiler import GPUTarget

    from plugins.kernels import aot_kernel, ptx_parameters
    from plugins.spec import evaluate
    dims = dict(B=3, T=37, N=1, P=3, Hk=2, Hv=4, K=K, V=K, W=4, C=2 * 2 * K + 4 * K)
    for plugin in PLUGINS.values():
        shapes = [tuple(evaluate(e, dims) for e in t.dims) for t in plugin.inputs]
        k = aot_kernel(plugin, shapes, plugin.dtypes(dtype)[0], {"eps": 1e-6}, target=GPUTarget("cuda", 90, 32))
        params = ptx_parameters(k.ptx, k.name)
        n_in, n_out = len(plugin.inputs), len(plugin.outputs)
        assert params == ["u64"] * n_in + ["u32"] * len(k.args) + ["u64"] * n_out + ["u64", "u64"], plugin.name
        warps = plugin.launch(shapes, plugin.dtypes(dtype)[0], {"eps": 1e-6}).num_warps
        assert k.args == tuple(dims[s] for s in plugin.scalars) and k.block == (32 * warps, 1, 1)
        assert k.shared_mem <= 227 * 1024
        print(f"\n{plugin.name} {dtype} K=V={K}: {k.name}, grid {k.grid}, block {k.block}, "
              f"shared {k.shared_mem} B, {len(k.ptx)} B of PTX")
