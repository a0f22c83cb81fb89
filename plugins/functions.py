"""Each plugin's computation in standard ONNX, as a model-local function (FunctionProto) named like the plugin.

A TensorRT ONNX file carries these next to its plugin nodes: TensorRT's parser imports a node with a
`plugin_namespace` attribute as the registered plugin, while ONNX Runtime, which knows no such plugin, inlines the
function, so the very file TensorRT builds from also runs on CPU and can be checked against the eager model. The
bodies follow model/kernels/reference.py in float32 (inputs are cast up, outputs back to their dtype): the conv as a
grouped Conv over [state, x]; the gated delta rule chunked like the kernels, the solve writing the chunk terms in
the kernel's layout (the unit-triangular solve by forward substitution, a Scan over a chunk's rows) and the scan
walking the chunks by a Scan carrying the state; the decode step from those two, with pool rows gathered by slot
and scattered back. Channel and head counts are fixed per model, so the
bodies are built for the model's dimensions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .spec import CHUNK, NAMESPACE, PLUGINS, VERSION

FLOAT = TensorProto.FLOAT
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")   # TensorRT's, carried on every plugin node


class _Body:
    """Nodes of one function body (or Scan body) with generated value names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.count = prefix, [], 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attrs):
        names = [f"{self.prefix}{self.count}_{i}" for i in range(outputs)]
        self.count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def f32(self, x: str) -> str:
        return self.op("Cast", x, to=FLOAT)

    def l2_normalize(self, x: str) -> str:
        """x * rsqrt(sum(x^2) + 1e-6) over the last dim (reference.l2_normalize)."""
        ss = self.op("ReduceSum", self.op("Mul", x, x), self.const([-1]), keepdims=1)
        return self.op("Mul", x,
                       self.op("Reciprocal", self.op("Sqrt", self.op("Add", ss, self.const(1e-6, np.float32)))))

    def heads_first(self, x: str, group: int, heads: int, dim: int) -> str:
        """[B, T, Hk, D] -> [B, Hk*group, T, D], each key head repeated for its group of value heads."""
        if group > 1:
            x = self.op("Expand", self.op("Unsqueeze", x, self.const([3])), self.const([1, 1, 1, group, 1]))
            x = self.op("Reshape", x, self.const([0, 0, heads, dim]))
        return self.op("Transpose", x, perm=[0, 2, 1, 3])

    def chunked(self, x: str, padded_len: str, width: int | None) -> str:
        """[B, H, T(, D)] -> [B, H, n, CHUNK(, D)], zero-padded to n * CHUNK steps."""
        steps = self.op("Gather", self.op("Shape", x), self.const(2), axis=0)
        pad = self.op("Sub", padded_len, steps)
        x = self.op("Pad", x, self.op("Concat", self.const([0]), self.op("Unsqueeze", pad, self.const([0])), axis=0),
                    self.const(0.0, np.float32), self.const([2]))
        return self.op("Reshape", x, self.const([0, 0, -1, CHUNK] + ([width] if width else [])))

    def steps(self, x: str) -> str:
        """T of a [B, T, ...] value."""
        return self.op("Gather", self.op("Shape", x), self.const(1), axis=0)

    def padded_length(self, x: str) -> str:
        """T rounded up to a whole number of chunks, from a [B, T, ...] value."""
        chunk = self.const(CHUNK)
        return self.op("Mul", self.op("Div", self.op("Add", self.steps(x), self.const(CHUNK - 1)), chunk), chunk)

    def first_steps(self, x: str, like: str) -> str:
        """[B, N*CHUNK, ...] cut to the T steps of `like` ([B, T, ...])."""
        return self.op("Slice", x, self.const([0]), self.op("Unsqueeze", self.steps(like), self.const([0])),
                       self.const([1]))

    def attribute_value(self, name: str) -> str:
        """A float attribute of the calling node, as a value."""
        node = helper.make_node("Constant", [], [f"{self.prefix}{self.count}_0"])
        self.count += 1
        node.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name=name,
                                                  type=onnx.AttributeProto.FLOAT))
        self.nodes.append(node)
        return node.output[0]


def _graph(name: str, body: _Body, inputs: dict, outputs: dict) -> onnx.GraphProto:
    """A Scan body over float32 values of the given ranks."""
    info = lambda n, rank: helper.make_tensor_value_info(n, FLOAT, [None] * rank)  # noqa: E731
    return helper.make_graph(body.nodes, name, [info(*i) for i in inputs.items()], [info(*o) for o in outputs.items()])


def _function(plugin_name: str, body: _Body, outputs: list[str], opset: int) -> onnx.FunctionProto:
    plugin = PLUGINS[plugin_name]
    names = [t.name for t in plugin.outputs]
    # Bind the computed values to the declared output names.
    for value, name in zip(outputs, names):
        body.nodes.append(helper.make_node("Identity", [value], [name]))
    return helper.make_function(NAMESPACE, plugin.name, [t.name for t in plugin.inputs], names, body.nodes,
                                [helper.make_opsetid("", opset), helper.make_opsetid(NAMESPACE, int(VERSION))],
                                attributes=[*PLUGIN_ATTRIBUTES, *(a.name for a in plugin.attributes)])


def causal_conv1d(dims: dict, opset: int) -> onnx.FunctionProto:
    C, W = dims["C"], dims["W"]
    b = _Body("conv")
    x = b.op("Transpose", b.f32("x"), perm=[0, 2, 1])                                   # [B, C, T]
    full = b.op("Concat", b.f32("state"), x, axis=2)                                    # [B, C, W-1+T]
    conv = b.op("Conv", full, b.op("Unsqueeze", b.f32("weight"), b.const([1])), group=C, kernel_shape=[W])
    y = b.op("Transpose", b.op("Mul", conv, b.op("Sigmoid", conv)), perm=[0, 2, 1])
    tail = b.op("Slice", full, b.const([-(W - 1)]), b.const([np.iinfo(np.int64).max]), b.const([2]))
    return _function("causal_conv1d", b, [b.op("CastLike", y, "x"), b.op("CastLike", tail, "state")], opset)


def _forward_substitution() -> onnx.GraphProto:
    """Scan body: row i of X = R_i - A_i X, X accumulating the solved rows (rows past i are still zero)."""
    b = _Body("row")
    prod = b.op("MatMul", b.op("Unsqueeze", "a_i", b.const([-2])), "X")                 # [B, H, n, 1, D]
    x_i = b.op("Sub", "r_i", b.op("Squeeze", prod, b.const([-2])))
    X = b.op("Add", "X", b.op("Mul", b.op("Unsqueeze", "e_i", b.const([-1])), b.op("Unsqueeze", x_i, b.const([-2]))))
    b.nodes.append(helper.make_node("Identity", [X], ["X_out"]))
    return _graph("forward_substitution", b, dict(X=5, a_i=4, r_i=4, e_i=1), dict(X_out=5))


def gated_delta_rule_solve(dims: dict, opset: int) -> onnx.FunctionProto:
    Hk, Hv, K, V = dims["Hk"], dims["Hv"], dims["K"], dims["V"]
    b = _Body("solve")
    padded = b.padded_length("v")
    q = b.op("Mul", b.l2_normalize(b.f32("q")), b.const(K**-0.5, np.float32))
    q, k = (b.chunked(b.heads_first(x, Hv // Hk, Hv, K), padded, K) for x in (q, b.l2_normalize(b.f32("k"))))
    v = b.chunked(b.op("Transpose", b.f32("v"), perm=[0, 2, 1, 3]), padded, V)            # [B, Hv, n, C, V]
    g, beta = (b.chunked(b.op("Transpose", b.f32(x), perm=[0, 2, 1]), padded, None) for x in ("g", "beta"))
    c = b.op("CumSum", g, b.const(-1))                                                  # [B, Hv, n, C]
    diff = b.op("Sub", b.op("Unsqueeze", c, b.const([-1])), b.op("Unsqueeze", c, b.const([-2])))
    causal = np.tril(np.ones((CHUNK, CHUNK), bool))
    # Masked before exp: above the diagonal c_i - c_j is positive and could overflow.
    decay = b.op("Exp", b.op("Where", b.const(causal, bool), diff, b.const(-np.inf, np.float32)))
    strict = b.op("Mul", decay, b.const(1 - np.eye(CHUNK), np.float32))
    A = b.op("Mul", b.op("Mul", b.op("Unsqueeze", beta, b.const([-1])), b.op("MatMul", k, _transposed(b, k))), strict)
    rhs = b.op("Concat", b.op("Mul", b.op("Unsqueeze", beta, b.const([-1])), v),
               b.op("Mul", b.op("Unsqueeze", b.op("Mul", beta, b.op("Exp", c)), b.const([-1])), k), axis=-1)
    zeros = b.op("ConstantOfShape", b.op("Shape", rhs), value=numpy_helper.from_array(np.zeros(1, np.float32)))
    solved = b.op("Scan", zeros, A, rhs, b.const(np.eye(CHUNK, dtype=np.float32), np.float32), num_scan_inputs=3,
                  scan_input_axes=[3, 3, 0], body=_forward_substitution())               # [U_v | U_k]
    c_last = b.op("Slice", c, b.const([-1]), b.const([CHUNK]), b.const([-1]))           # [B, Hv, n, 1]
    q_decayed = b.op("Mul", q, b.op("Unsqueeze", b.op("Exp", c), b.const([-1])))
    k_to_end = b.op("Mul", k, b.op("Unsqueeze", b.op("Exp", b.op("Sub", c_last, c)), b.const([-1])))
    attn = b.op("Mul", b.op("MatMul", q, _transposed(b, k)), decay)
    u_v, u_k = b.op("Split", solved, b.const([V, K]), axis=-1, outputs=2)
    o_v = b.op("MatMul", attn, u_v)
    q_s = b.op("Sub", b.op("MatMul", attn, u_k), q_decayed)
    u = b.op("Concat", u_v, o_v, u_k, q_s, k_to_end, axis=-1)                         # [B, Hv, n, C, 2V+3K]
    u = b.op("Reshape", u, b.const([0, 0, -1, 2 * V + 3 * K]))
    return _function("gated_delta_rule_solve", b, [u, b.op("Exp", b.op("Squeeze", c_last, b.const([-1])))], opset)


def _transposed(b: _Body, x: str) -> str:
    """The last two dims of a [B, H, n, C, D] value swapped."""
    return b.op("Transpose", x, perm=[0, 1, 2, 4, 3])


def _chunk_step() -> onnx.GraphProto:
    """Scan body over chunks: the chunk's outputs from the state S, then the state after it (reference.py), from the
    solve's terms."""
    b = _Body("chunk")
    U = b.op("Sub", "u_v", b.op("MatMul", "u_k", "S"))                                  # [B, H, C, V]
    out = b.op("Sub", "o_v", b.op("MatMul", "q_s", "S"))
    k_to_end = b.op("Transpose", "k_to_end", perm=[0, 1, 3, 2])
    S = b.op("Add", b.op("Mul", b.op("Unsqueeze", "decay", b.const([-1, -2])), "S"), b.op("MatMul", k_to_end, U))
    b.nodes += [helper.make_node("Identity", [S], ["S_out"]), helper.make_node("Identity", [out], ["out"])]
    return _graph("chunk_step", b, dict(S=4, u_v=4, o_v=4, u_k=4, q_s=4, k_to_end=4, decay=2),
                  dict(S_out=4, out=4))


def gated_delta_rule_scan(dims: dict, opset: int) -> onnx.FunctionProto:
    K, V = dims["K"], dims["V"]
    b = _Body("scan")
    u = b.op("Reshape", "u", b.const([0, 0, -1, CHUNK, 2 * V + 3 * K]))                   # [B, Hv, N, C, ...]
    terms = b.op("Split", u, b.const([V, V, K, K, K]), axis=-1, outputs=5)
    S, out = b.op("Scan", "initial_state", *terms, "decay", outputs=2, num_scan_inputs=6,
                  scan_input_axes=[2] * 6, scan_output_axes=[2], body=_chunk_step())
    o = b.op("Reshape", out, b.const([0, 0, -1, V]))                                    # [B, Hv, N*C, V]
    return _function("gated_delta_rule_scan", b, [b.op("Transpose", o, perm=[0, 2, 1, 3]), S], opset)


def gated_deltanet_decode(dims: dict, opset: int) -> onnx.FunctionProto:
    Hk, Hv, K, V = dims["Hk"], dims["Hv"], dims["K"], dims["V"]
    G = Hv // Hk
    b = _Body("decode")
    shape = lambda *d: b.const(list(d))  # noqa: E731  (0 keeps an input dim, -1 infers one)
    heads = b.op("Reshape", "qkvz", shape(0, 0, Hk, 2 * K + 2 * G * V))
    q, k, v, z = b.op("Split", heads, b.const([K, K, G * V, G * V]), axis=-1, outputs=4)
    gates = b.op("Reshape", "ba", shape(0, 0, Hk, 2 * G))
    beta_logit, a = (b.op("Reshape", x, shape(0, 0, Hv)) for x in b.op("Split", gates, b.const([G, G]), axis=-1,
                                                                         outputs=2))
    mixed = b.op("Concat", *(b.op("Reshape", x, shape(0, 0, -1)) for x in (q, k, v)), axis=-1)
    rows = b.op("Cast", b.op("Max", "slots", b.const(0, np.int32)), to=TensorProto.INT64)
    conv_state = b.op("Gather", "conv_state", rows, axis=0)
    mixed, new_conv = b.op("causal_conv1d", mixed, "conv_weight", conv_state, domain=NAMESPACE, outputs=2)
    q, k, v = b.op("Split", mixed, b.const([Hk * K, Hk * K, Hv * V]), axis=-1, outputs=3)
    q, k = (b.op("Reshape", x, shape(0, 0, Hk, K)) for x in (q, k))
    v = b.op("Reshape", v, shape(0, 0, Hv, V))
    # g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b), in float32 (reference.decay_and_beta)
    g = b.op("Mul", b.op("Neg", b.op("Exp", b.f32("A_log"))), b.op("Softplus", b.op("Add", b.f32(a), b.f32("dt_bias"))))
    beta = b.op("CastLike", b.op("Sigmoid", b.f32(beta_logit)), "qkvz")
    state = b.op("Gather", "recurrent_state", rows, axis=0)
    u, decay = b.op("gated_delta_rule_solve", q, k, v, g, beta, domain=NAMESPACE, outputs=2)
    o, new_state = b.op("gated_delta_rule_scan", u, decay, state, domain=NAMESPACE, outputs=2)
    o = b.op("CastLike", b.first_steps(o, "qkvz"), "qkvz")          # as the op returns it: T steps, model dtype
    # gated RMSNorm over V: x * rsqrt(mean(x^2) + eps) * w * silu(z) (reference.gated_rms_norm)
    of = b.f32(o)
    eps = b.attribute_value("eps")
    norm = b.op("Reciprocal", b.op("Sqrt", b.op("Add", b.op("ReduceMean", b.op("Mul", of, of), b.const([-1]),
                                                             keepdims=1), eps)))
    zf = b.f32(b.op("Reshape", z, shape(0, 0, Hv, V)))
    o = b.op("Mul", b.op("Mul", b.op("Mul", of, norm), b.f32("norm_weight")), b.op("Mul", zf, b.op("Sigmoid", zf)))
    live = b.op("GreaterOrEqual", "slots", b.const(0, np.int32))
    o = b.op("Where", b.op("Unsqueeze", live, b.const([1, 2])), b.op("Reshape", o, shape(0, 0, Hv * V)),
             b.const(0.0, np.float32))
    pool_rows = b.op("Gather", b.op("Shape", "conv_state"), b.const(0), axis=0)
    return _function("gated_deltanet_decode", b,
                     [b.op("CastLike", o, "qkvz"),
                      _scatter_rows(b, "conv_state", b.op("CastLike", new_conv, "conv_state"), "slots", live,
                                    pool_rows),
                      _scatter_rows(b, "recurrent_state", new_state, "slots", live, pool_rows)],
                     opset)


def _scatter_rows(b: _Body, pool: str, rows: str, slots: str, live: str, pool_rows: str) -> str:
    """pool[slots[i]] = rows[i] for live rows; padding rows write a spare row past the pool, cut off afterwards."""
    spare = b.op("Concat", pool, b.op("Slice", pool, b.const([0]), b.const([1]), b.const([0])), axis=0)
    index = b.op("Where", live, b.op("Cast", slots, to=TensorProto.INT64), pool_rows)
    written = b.op("ScatterND", spare, b.op("Unsqueeze", index, b.const([-1])), rows)
    return b.op("Slice", written, b.const([0]), b.op("Unsqueeze", pool_rows, b.const([0])), b.const([0]))


BUILDERS = {"causal_conv1d": causal_conv1d, "gated_delta_rule_solve": gated_delta_rule_solve,
            "gated_delta_rule_scan": gated_delta_rule_scan, "gated_deltanet_decode": gated_deltanet_decode}


def functions(dims: dict, opset: int, names=None) -> list[onnx.FunctionProto]:
    """Function bodies for a model's dimensions (C conv channels, W, Hk, Hv, K, V): those of the plugins `names`
    (default: all) and of every plugin their bodies call (the decode step's calls the other three)."""
    wanted, built = list(names or BUILDERS), {}
    while wanted:
        name = wanted.pop()
        if name not in built:
            built[name] = BUILDERS[name](dims, opset)
            wanted += [node.op_type for node in built[name].node if node.domain == NAMESPACE]
    return [built[n] for n in BUILDERS if n in built]
