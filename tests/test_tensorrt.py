"""--target tensorrt where TensorRT cannot run: the ONNX graphs, their plugin nodes, and what stands in for the engine.

1. The graphs pass onnx.checker, and every plugin node carries what its plugin registers: name, namespace, version,
   attributes, tensor counts, dtypes and ranks, read from plugins/spec.py, the description plugins/register.py
   registers with tensorrt.plugin (with TensorRT installed, a test reads TensorRT's own registry too).
2. ONNX Runtime runs those very files on CPU, each plugin node as its ONNX function body, and matches the eager model
   (float32, 1e-4): prefill, chunked prefill, decode, the prefill/decode handoff, ragged rows, snapshots.
3. The PTX aot_impl hands TensorRT is checked in tests/test_plugin_kernels.py (compiled here, launched on a GPU).
Engines are built and run only where TensorRT is installed (skipped here with that reason).
"""

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch

import runtime
from export.__main__ import main as export_main
from model import Qwen3NextForCausalLM
from plugins import NAMESPACE, PLUGINS, VERSION
from plugins.spec import PluginSpecError, evaluate, markdown
from runtime import ArtifactError
from runtime.tensorrt_backend import OnnxFunctionBackend, prefill_chunks
from tests.conftest import randomize, small_config

pytest.importorskip("onnxruntime", reason="the graphs are checked with ONNX Runtime (dev extra)")
pytestmark = pytest.mark.slow
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int32": onnx.TensorProto.INT32}


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random MoE model with two value heads per key head and 64-dim heads (the tiny preset's), exported with
    --target tensorrt on this machine (no TensorRT): (checkpoint, artifact, what the export printed)."""
    root = tmp_path_factory.mktemp("tensorrt")
    ckpt, out = root / "ckpt", root / "art"
    config = small_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                          shared_expert_intermediate_size=24, linear_key_head_dim=64, linear_value_head_dim=64,
                          linear_num_key_heads=1, linear_num_value_heads=2, max_position_embeddings=512)
    randomize(Qwen3NextForCausalLM(config), seed=3, scale=0.05).save_pretrained(ckpt)
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export_main([str(ckpt), "--out", str(out), "--target", "tensorrt", "--max-batch", "4",
                            "--max-seq-len", "160", "--verify-tokens", "40"]) == 0
    return ckpt, out, printed.getvalue()


@pytest.fixture(scope="module")
def function_engine(exported):
    _, out, _ = exported
    manifest = runtime.Manifest.load(out)
    return runtime.Engine(out, manifest, OnnxFunctionBackend(out, manifest))


def graphs(out):
    return {role: onnx.load(str(out / f"tensorrt/{role}.onnx")) for role in ("prefill", "decode")}


# ---- 1. the graphs and their plugin nodes ------------------------------------------------------------------------

def test_graphs_pass_the_checker_and_plugin_nodes_carry_what_the_plugins_register(exported):
    _, out, _ = exported
    used = {}
    for role, model in graphs(out).items():
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model)
        types = _types(inferred)
        assert (NAMESPACE, int(VERSION)) in {(o.domain, o.version) for o in model.opset_import}
        functions = {(f.domain, f.name): f for f in model.functions}
        for node in (n for n in model.graph.node if n.domain == NAMESPACE):
            plugin = PLUGINS[node.op_type]
            used.setdefault(role, set()).add(plugin.name)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs.pop("plugin_namespace") == NAMESPACE.encode() and attrs.pop("plugin_version") == b"1"
            assert attrs.pop("aot") == 1
            assert {n: type(v) for n, v in attrs.items()} == {a.name: a.type for a in plugin.attributes}
            assert len(node.input) == len(plugin.inputs) and len(node.output) == len(plugin.outputs)
            model_dtype = _dtype_name(types[node.input[0]].elem_type)
            inputs, outputs = plugin.dtypes(model_dtype)
            for names, specs, dtypes in ((node.input, plugin.inputs, inputs), (node.output, plugin.outputs, outputs)):
                for name, spec, dtype in zip(names, specs, dtypes):
                    assert types[name].elem_type == ONNX_DTYPES[dtype], (node.op_type, spec.name)
                    assert len(types[name].shape.dim) == len(spec.dims), (node.op_type, spec.name)
            body = functions[(NAMESPACE, plugin.name)]
            assert list(body.input) == [t.name for t in plugin.inputs]
            assert list(body.output) == [t.name for t in plugin.outputs]
            assert set(body.attribute) == {"plugin_namespace", "plugin_version", "aot", *(a.name for a in
                                                                                         plugin.attributes)}
    assert used == {"prefill": {"causal_conv1d", "gated_delta_rule_solve", "gated_delta_rule_scan"},
                    "decode": {"gated_deltanet_decode"}}
    # Each file holds the bodies of its plugins and of the plugins those bodies call (decode's calls the others).
    assert {role: {f.name for f in model.functions} for role, model in graphs(out).items()} == {
        "prefill": used["prefill"], "decode": {*used["decode"], *used["prefill"]}}
    m = json.loads((out / "manifest.json").read_text())["targets"]["tensorrt"]
    assert m["plugins"] == {name: f"{NAMESPACE}::{name}" for name in PLUGINS}
    assert m["plugin_nodes"] == {"prefill": 3 * 3, "decode": 3}        # three DeltaNet layers


def _types(model):
    types = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        types[v.name] = v.type.tensor_type
    for t in model.graph.initializer:
        types[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type
    return types


def _dtype_name(elem_type):
    return {v: k for k, v in ONNX_DTYPES.items()}[elem_type]


def test_only_deltanet_states_are_bound_in_place(exported):
    """Past and present share a buffer only where the plugin reading the state is the one writing it; the KV caches
    and lengths are read by other nodes after their present value exists."""
    _, out, _ = exported
    m = json.loads((out / "manifest.json").read_text())
    in_place = m["targets"]["tensorrt"]["in_place"]
    deltanet = [s["name"] for s in m["state"] if s["name"].split(".")[0] in ("conv_state", "recurrent_state")]
    assert in_place == {"prefill": deltanet, "decode": deltanet} and len(deltanet) == 6


def test_plugin_descriptions_bind_shapes_and_refuse_what_they_cannot_run():
    conv = PLUGINS["causal_conv1d"]
    dims = conv.bind([(3, 37, 200), (200, 4), (3, 200, 3)])
    assert dims == {"B": 3, "T": 37, "C": 200, "W": 4}
    assert conv.output_shapes(dims) == [(3, 37, 200), (3, 200, 3)]
    launch = conv.launch([(3, 37, 200), (200, 4), (3, 200, 3)], ["bfloat16"] * 3)
    assert launch.grid == (3, 1, 2) and launch.args == (37,)
    with pytest.raises(PluginSpecError, match="W-1 = 3"):
        conv.bind([(3, 37, 200), (200, 4), (3, 200, 2)])
    with pytest.raises(PluginSpecError, match="dtypes do not fit"):
        PLUGINS["gated_delta_rule_solve"].model_dtype(["bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16"])
    with pytest.raises(PluginSpecError, match="dtypes do not fit"):     # float32 whatever the model's dtype
        PLUGINS["gated_delta_rule_scan"].model_dtype(["bfloat16", "float32", "float32"])
    channels = object()     # a dimension known only at run time
    with pytest.raises(PluginSpecError, match="C must be fixed when the engine is built"):
        conv.bind([(3, 37, channels), (channels, 4), (3, channels, 3)])
    decode = PLUGINS["gated_deltanet_decode"]
    shapes = [tuple(evaluate(e, dict(B=2, T=1, P=2, Hk=16, Hv=32, K=128, V=128, W=4)) for e in t.dims)
              for t in decode.inputs]
    launch = decode.launch(shapes, decode.dtypes("bfloat16")[0], {"eps": 1e-6})
    assert launch.grid == (2, 32) and launch.num_warps == 4 and launch.constexprs["EPS"] == 1e-6
    with pytest.raises(PluginSpecError, match="multiple of key heads"):
        decode.launch([tuple(evaluate(e, dict(B=2, T=1, P=2, Hk=3, Hv=4, K=8, V=8, W=4)) for e in t.dims)
                       for t in decode.inputs], decode.dtypes("float32")[0], {"eps": 1e-6})


def test_chunked_rule_intermediates_pass_from_solve_to_scan():
    """The solve's outputs cover whole chunks of 64 steps, which the scan binds as its inputs."""
    solve, scan = PLUGINS["gated_delta_rule_solve"], PLUGINS["gated_delta_rule_scan"]
    q, v, g = (3, 131, 2, 48), (3, 131, 4, 80), (3, 131, 4)
    u, decay = solve.output_shapes(solve.bind([q, q, v, g, g]))
    assert u == (3, 4, 192, 2 * 80 + 3 * 48) and decay == (3, 4, 3)
    dims = scan.bind([u, decay, (3, 4, 48, 80)])
    assert dims["N"] == 3 and scan.output_shapes(dims) == [(3, 192, 4, 80), (3, 4, 48, 80)]
    with pytest.raises(PluginSpecError, match="N\\*64 = 128"):
        scan.bind([(3, 4, 131, 304), (3, 4, 2), (3, 4, 48, 80)])
    assert solve.launch([q, q, v, g, g], solve.dtypes("bfloat16")[0]).grid == (3, 12)
    launch = scan.launch([u, decay, (3, 4, 48, 80)], scan.dtypes("bfloat16")[0])
    assert launch.grid == (12, 5) and launch.args == (3,) and launch.constexprs["BV"] == 16


class Symbol:
    """A stand-in for a TensorRT shape expression: + and * with ints on either side and // by an int (the spec
    turns ints to the right); anything else fails."""

    def __init__(self, text):
        self.text = text

    def _op(self, op, other):
        if not isinstance(other, int):
            raise TypeError(f"({self.text}) {op} {other!r}")
        return Symbol(f"({self.text}){op}{other}")

    __add__ = lambda self, other: self._op("+", other)  # noqa: E731
    __mul__ = lambda self, other: self._op("*", other)  # noqa: E731
    __floordiv__ = lambda self, other: self._op("//", other)  # noqa: E731


def test_launches_and_output_shapes_take_symbolic_run_time_dims():
    """What aot_impl and the shape descriptor compute from TensorRT's expressions, for every plugin."""
    for plugin in PLUGINS.values():
        static = dict(Hk=2, Hv=4, K=64, V=64, W=4, C=2 * 2 * 64 + 4 * 64)
        dims = {**static, **{name: Symbol(name) for name in plugin.dynamic}}
        shapes = [tuple(evaluate(e, dims) for e in t.dims) for t in plugin.inputs]
        launch = plugin.launch(shapes, plugin.dtypes("bfloat16")[0], {"eps": 1e-6})
        for value in (*launch.grid, *launch.args):
            assert isinstance(value, (int, Symbol))
        plugin.output_shapes(plugin.bind(shapes))
    solve = PLUGINS["gated_delta_rule_solve"]
    dims = solve.bind([(Symbol("B"), Symbol("T"), 2, 64), (Symbol("B"), Symbol("T"), 2, 64),
                       (Symbol("B"), Symbol("T"), 4, 64), (Symbol("B"), Symbol("T"), 4), (Symbol("B"), Symbol("T"), 4)])
    u, decay = solve.output_shapes(dims)
    assert u[2].text == "(((T)+63)//64)*64" and decay[2].text == "((T)+63)//64"


def test_readme_tables_are_the_plugin_descriptions():
    from pathlib import Path
    readme = (Path(__file__).parents[1] / "plugins" / "README.md").read_text()
    for plugin in PLUGINS.values():
        assert markdown(plugin) in readme, f"plugins/README.md is out of date for {plugin.name}: paste " \
                                           "plugins.spec.markdown(plugin)"


@pytest.mark.skipif(not HAVE_TENSORRT, reason="needs TensorRT (not installable on the project's machines)")
def test_tensorrt_registry_holds_the_described_plugins():
    import tensorrt.plugin._lib as lib

    import plugins.register  # noqa: F401
    for plugin in PLUGINS.values():
        registered = lib.QDP_REGISTRY[plugin.id]
        assert registered.input_tensor_names == [t.name for t in plugin.inputs]
        assert list(registered.input_attrs) == [a.name for a in plugin.attributes]
        assert registered.num_outputs == len(plugin.outputs) and registered.aot_impl_func is not None


# ---- 2. ONNX Runtime runs the very files, plugin nodes as their function bodies ---------------------------------

def run_plugin_node(name, feeds, dims, attrs=None):
    """One plugin node, in a model holding the plugins' function bodies, run by ONNX Runtime (float32)."""
    import onnxruntime as ort

    from export.tensorrt_onnx import node_attributes
    from plugins.functions import functions
    plugin = PLUGINS[name]
    types = {"T": onnx.TensorProto.FLOAT, "float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32}
    info = lambda t: onnx.helper.make_tensor_value_info(t.name, types[t.dtype], [None] * len(t.dims))  # noqa: E731
    node = onnx.helper.make_node(name, [t.name for t in plugin.inputs], [t.name for t in plugin.outputs],
                                 domain=NAMESPACE, **node_attributes(plugin, attrs))
    graph = onnx.helper.make_graph([node], name, [info(t) for t in plugin.inputs], [info(t) for t in plugin.outputs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21),
                                                         onnx.helper.make_opsetid(NAMESPACE, 1)],
                                   functions=functions(dims, 21))
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(x) for x in session.run(None, {k: v.numpy() for k, v in feeds.items()})]


def test_function_bodies_compute_the_ops():
    """Each body against model/kernels/reference.py (float64), with padding rows and a pool larger than the batch."""
    from model.kernels import reference as ref
    from tests.test_kernels import chunk_terms64, float64_loop, random_inputs
    from tests.test_kernels import rel as trel
    from tests.test_triton_kernels import decode_inputs
    g = torch.Generator().manual_seed(0)
    x, w, state = (torch.randn(3, 37, 40, generator=g), torch.randn(40, 4, generator=g),
                   torch.randn(3, 40, 3, generator=g))
    dims = dict(C=40, W=4, Hk=1, Hv=1, K=1, V=1)
    y, new_state = run_plugin_node("causal_conv1d", dict(x=x, weight=w, state=state), dims)
    y64, new64 = ref.causal_conv1d(x.double(), w.double(), state.double())
    assert trel(y, y64) < 1e-6 and trel(new_state, new64) < 1e-7
    B, T, Hk, Hv, K, V = 2, 131, 2, 4, 16, 24
    q, k, v, gate, beta, state = random_inputs(B, T, Hk, Hv, K, V, True, seed=3)
    dims = dict(C=1, W=4, Hk=Hk, Hv=Hv, K=K, V=V)
    u, decay = run_plugin_node("gated_delta_rule_solve", dict(q=q, k=k, v=v, g=gate, beta=beta), dims)
    u64, decay64 = chunk_terms64(q, k, v, gate, beta)      # the Triton solve kernel's layout
    assert u.shape == u64.shape and trel(u, u64) < 1e-6 and trel(decay, decay64) < 1e-6
    o, final = run_plugin_node("gated_delta_rule_scan", dict(u=u, decay=decay, initial_state=state), dims)
    o64, s64 = float64_loop(q, k, v, gate, beta, state)
    assert o.shape == (B, 192, Hv, V) and (o[:, T:] == 0).all()
    assert trel(o[:, :T], o64) < 1e-5 and trel(final, s64) < 1e-5
    for B, T, Hk, group, K, V, pool, slots in [(4, 1, 2, 2, 16, 8, 6, [5, -1, 0, 2]), (2, 3, 1, 3, 8, 8, 2, [1, 0])]:
        raw = decode_inputs(B, T, Hk, group, K, V, pool, seed=B)
        slots = torch.tensor(slots, dtype=torch.int32)
        expected = {n: t.double().clone() for n, t in raw.items()}
        o64 = ref.gated_deltanet_decode(**expected, slots=slots, eps=1e-6)
        feeds = {**raw, "slots": slots, "arrivals": torch.zeros(B, Hk, dtype=torch.int32)}
        dims = dict(C=2 * Hk * K + Hk * group * V, W=4, Hk=Hk, Hv=Hk * group, K=K, V=V)
        o, conv, rec = run_plugin_node("gated_deltanet_decode", feeds, dims, {"eps": 1e-6})
        assert trel(o, o64) < 1e-5 and (o[slots < 0] == 0).all()
        assert trel(conv, expected["conv_state"]) < 1e-7 and trel(rec, expected["recurrent_state"]) < 1e-5


def test_export_checked_the_graphs_and_says_how_to_build_the_engines(exported):
    _, out, printed = exported
    m = json.loads((out / "manifest.json").read_text())
    entry = m["targets"]["tensorrt"]
    assert m["parity"]["tensorrt-onnx"]["rel_error"] < 1e-4 and m["parity"]["tensorrt-onnx"]["top1_agreement"] == 1
    if HAVE_TENSORRT:
        pytest.skip("TensorRT is installed: the engines were built")
    assert entry["engine"] == "not built" and "TensorRT is not installed" in entry["engine_not_built"]
    assert "tensorrt" not in m["parity"]
    assert f"python -m export.tensorrt {out}" in printed and f"trtexec --onnx={out}/tensorrt/decode.onnx" in printed
    assert sorted(p.name for p in (out / "tensorrt").iterdir()) == ["decode.onnx", "prefill.onnx"]


def test_prefill_decode_and_handoff_match_eager(exported, function_engine):
    ckpt, _, _ = exported
    ids = np.random.default_rng(0).integers(0, 101, size=(2, 40))
    with torch.no_grad():
        expected = Qwen3NextForCausalLM.from_pretrained(ckpt)(torch.as_tensor(ids)).numpy()
    state = function_engine.new_state(2)
    got = [function_engine.prefill(ids[:, :13], state), function_engine.prefill(ids[:, 13:30], state)]
    got += [function_engine.decode(ids[:, t], state) for t in range(30, 40)]
    assert rel(np.stack(got, 1), expected[:, [12, 29, *range(30, 40)]]) < 1e-4
    assert state.lengths.tolist() == [40, 40]


def test_ragged_rows_and_snapshots(exported, function_engine):
    rows = [np.arange(5, 25) % 101, np.arange(40, 47) % 101, np.array([9])]
    state = function_engine.new_state(3)
    ragged = function_engine.prefill(rows, state)                  # a one-token row runs decode.onnx
    snapshot = state.clone()
    nxt = function_engine.decode([1, 2, 3], state)
    for b, r in enumerate(rows):
        single = function_engine.new_state(1)
        assert rel(function_engine.prefill([r], single), ragged[b:b + 1]) < 1e-5
        assert rel(function_engine.decode([b + 1], single), nxt[b:b + 1]) < 1e-5
    state.restore(snapshot)
    np.testing.assert_array_equal(function_engine.decode([1, 2, 3], state), nxt)


# ---- what stands in for the engines where TensorRT is absent ----------------------------------------------------

def test_prefill_chunks_fit_the_profile():
    assert prefill_chunks(5, 512) == [5] and prefill_chunks(1, 512) == [1]
    assert prefill_chunks(1025, 512) == [512, 511, 2]
    for n in range(2, 40):
        parts = prefill_chunks(n, 8)
        assert sum(parts) == n and all(2 <= p <= 8 for p in parts)


@pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed")
def test_tensorrt_backend_and_engine_builder_name_what_is_missing(exported, capsys):
    from export.tensorrt import main as build_main
    _, out, _ = exported
    with pytest.raises(ArtifactError, match=f"python -m export.tensorrt {out}"):
        runtime.load(out, backend="tensorrt", device="cuda")
    with pytest.raises(Exception, match="TensorRT is not installed"):
        build_main([str(out)])
    from bench.backends import Unavailable, open_engine, open_target
    with pytest.raises(Unavailable, match="no engines"):
        open_engine("tensorrt", open_target(str(out), "cuda", None, None, 4, None), "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TENSORRT and torch.cuda.is_available()), reason="needs TensorRT and a CUDA GPU")
def test_engines_build_and_match_eager(tmp_path, exported):
    ckpt, _, _ = exported
    out = tmp_path / "engine"
    for dtype, tolerance in (("float32", 1e-3), ("bfloat16", 5e-2)):
        assert export_main([str(ckpt), "--out", str(out), "--overwrite", "--target", "tensorrt", "--device", "cuda",
                            "--dtype", dtype, "--max-batch", "4", "--max-seq-len", "160"]) == 0
        m = json.loads((out / "manifest.json").read_text())
        print(f"\ntensorrt engine {dtype}: {m['parity']['tensorrt']}")
        assert m["parity"]["tensorrt"]["rel_error"] < tolerance
