"""The TensorRT plugins in plain Python: what each takes, returns and launches.

One description per plugin, read by everything that must agree on it: the `tensorrt.plugin` registration
(register.py), the ONNX nodes and function bodies the exporter writes (export/tensorrt_onnx.py, functions.py), the
README tables and the tests, none of which need TensorRT. A plugin carries the contract of a `nextdeploy::` torch
op (model/kernels/ops.py); the gated delta rule is two plugins, because an AOT plugin launches one kernel and the
chunked rule is two (a solve, then a scan over the chunks), with their float32 intermediates (u [B, Hv, N*64,
2*V+3*K] and decay [B, Hv, N] for N chunks of 64 steps) tensors between the two nodes.

Dimensions are expressions over named symbols ("B", "T", "Hv*V", "W-1", "(T+63)//64"). The symbols in `dynamic`
vary at run time (batch, tokens, pool rows); every other one is fixed when the engine is built and compiled into
the kernel.
`Plugin.launch` turns input shapes into the kernel's launch: its grid and int32 arguments are expressions of the
dimensions, so the same code gives TensorRT's symbolic expressions in aot_impl and plain ints in the tests.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

from model.kernels.launch import (CHUNK, chunk_operands, chunk_scan_launch, chunk_solve_precision, chunk_solve_warps,
                                  decode_warps, dot_block, next_power_of_2)

NAMESPACE = "nextdeploy"
VERSION = "1"
MODEL_DTYPES = ("float32", "float16", "bfloat16")


class PluginSpecError(ValueError):
    """Shapes or dtypes a plugin does not take."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[str, ...]
    dtype: str          # "T": the model's dtype (float32, float16 or bfloat16); or "float32", "int32"
    doc: str = ""


@dataclass(frozen=True)
class Attribute:
    name: str
    type: type
    doc: str = ""


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the Triton entry's compile-time constants, and the grid and int32 arguments as expressions
    of the input dimensions (ints, or TensorRT symbolic expressions)."""
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple
    args: tuple


@dataclass(frozen=True)
class Plugin:
    name: str
    op: str                              # the torch op (or part of it) whose contract this carries
    doc: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    kernel: str                          # the Triton entry in plugins/kernels.py
    scalars: tuple[str, ...]             # its int32 arguments, between the inputs and the outputs
    dynamic: tuple[str, ...]
    in_place: dict = field(default_factory=dict)    # output -> the input it may share a buffer with
    attributes: tuple[Attribute, ...] = ()
    plan: Callable[[dict, str, dict], Launch] = None

    @property
    def id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def symbols(self, shapes) -> dict:
        """Each dimension symbol's value (or expression) from the first input dimension it names, checking ranks
        only: what TensorRT's shape placeholders allow while it asks for output shapes."""
        if len(shapes) != len(self.inputs):
            raise PluginSpecError(f"{self.name} takes {len(self.inputs)} inputs, got {len(shapes)}")
        dims: dict[str, Any] = {}
        for t, shape in zip(self.inputs, shapes):
            if len(shape) != len(t.dims):
                raise PluginSpecError(f"{self.name} input {t.name} has rank {len(t.dims)} ({', '.join(t.dims)}), "
                                      f"got shape {tuple(shape)}")
            for expr, value in zip(t.dims, shape):
                if expr.isidentifier():
                    dims.setdefault(expr, value)
        return dims

    def bind(self, shapes) -> dict:
        """Symbol values from the input shapes (ints, or symbolic expressions for dynamic dimensions); checks that
        every dimension written as an expression agrees and that the static ones are ints."""
        dims = self.symbols(shapes)
        for name, value in dims.items():
            if name not in self.dynamic and not isinstance(value, int):
                raise PluginSpecError(f"{self.name}: dimension {name} must be fixed when the engine is built")
        for t, shape in zip(self.inputs, shapes):
            for expr, value in zip(t.dims, shape):
                want = evaluate(expr, dims)
                if isinstance(want, int) and isinstance(value, int) and want != value:
                    raise PluginSpecError(f"{self.name} input {t.name} has shape {tuple(shape)}, but its dims "
                                          f"({', '.join(t.dims)}) make {expr} = {want}")
        return dims

    def output_shapes(self, dims: dict) -> list[tuple]:
        return [tuple(evaluate(e, dims) for e in t.dims) for t in self.outputs]

    def dtypes(self, model_dtype: str) -> tuple[list[str], list[str]]:
        """Input and output dtypes for a model dtype."""
        if model_dtype not in MODEL_DTYPES:
            raise PluginSpecError(f"{self.name} runs {', '.join(MODEL_DTYPES)} models, not {model_dtype}")
        pick = lambda t: model_dtype if t.dtype == "T" else t.dtype  # noqa: E731
        return [pick(t) for t in self.inputs], [pick(t) for t in self.outputs]

    def model_dtype(self, input_dtypes) -> str:
        """The model dtype that input dtypes imply (float32 for a plugin without model-dtype inputs, whose dtypes
        are fixed); refuses dtypes the plugin does not take."""
        model = next((d for t, d in zip(self.inputs, input_dtypes) if t.dtype == "T"), "float32")
        expected, _ = self.dtypes(model)
        if list(input_dtypes) != expected:
            bad = [f"{t.name}: {d} (takes {e})" for t, d, e in zip(self.inputs, input_dtypes, expected) if d != e]
            raise PluginSpecError(f"{self.name} input dtypes do not fit: {'; '.join(bad)}")
        return model

    def launch(self, shapes, input_dtypes, attrs: dict | None = None) -> Launch:
        """The kernel launch for these input shapes and dtypes (and attribute values)."""
        attrs = {a.name: a.type(attrs[a.name]) for a in self.attributes} if self.attributes else {}
        return self.plan(self.bind(shapes), self.model_dtype(input_dtypes), attrs)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def evaluate(expr: str, dims: dict):
    """A dimension expression over `dims` (ints, or TensorRT symbolic expressions, which support + - * // with an
    int on their right only: commutative operations are turned around)."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise PluginSpecError(f"dimension {node.id} of {expr!r} is not given by any input")
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(a, int) and not isinstance(b, int) and isinstance(node.op, (ast.Add, ast.Mult)):
                a, b = b, a
            return _OPS[type(node.op)](a, b)
        raise PluginSpecError(f"unsupported dimension expression {expr!r}")
    return ev(ast.parse(expr, mode="eval").body)


def cdiv(a, b: int):
    return (a + (b - 1)) // b


def _group(d: dict) -> int:
    """Value heads per key head."""
    if d["Hv"] % d["Hk"]:
        raise PluginSpecError(f"value heads ({d['Hv']}) must be a multiple of key heads ({d['Hk']})")
    return d["Hv"] // d["Hk"]


# ---- causal conv1d --------------------------------------------------------------------------------------------

def _conv_plan(d, model_dtype, attrs) -> Launch:
    block_t, block_c = 64, 128     # fixed: T is only known at run time (BLOCK_T >= W-1 keeps the state in one tile)
    if d["W"] - 1 > block_t:
        raise PluginSpecError(f"causal_conv1d takes kernel widths up to {block_t + 1}, got {d['W']}")
    return Launch(dict(C=d["C"], W=d["W"], BLOCK_T=block_t, BLOCK_C=block_c), num_warps=4,
                  num_stages=3, grid=(d["B"], cdiv(d["T"], block_t), cdiv(d["C"], block_c)), args=(d["T"],))


CAUSAL_CONV1D = Plugin(
    name="causal_conv1d", op="nextdeploy::causal_conv1d",
    doc="Depthwise causal conv1d + SiLU over [state, x]; the new state is the last W-1 inputs.",
    inputs=(Tensor("x", ("B", "T", "C"), "T", "activations, channels last"),
            Tensor("weight", ("C", "W"), "T", "one filter per channel"),
            Tensor("state", ("B", "C", "W-1"), "T", "the W-1 inputs before x")),
    outputs=(Tensor("y", ("B", "T", "C"), "T", "silu(conv)"),
             Tensor("new_state", ("B", "C", "W-1"), "T", "the last W-1 inputs of [state, x]")),
    kernel="causal_conv1d_entry", scalars=("T",), dynamic=("B", "T"), in_place={"new_state": "state"},
    plan=_conv_plan)


# ---- the chunked gated delta rule: solve, then scan ------------------------------------------------------------

# The solve's outputs cover N = (T+63)//64 whole chunks, in model/kernels/triton_chunk.py's layout.
CHUNKS = f"(T+{CHUNK - 1})//{CHUNK}"
TERMS = "2*V+3*K"


def _solve_plan(d, model_dtype, attrs) -> Launch:
    K, V = d["K"], d["V"]
    # As model/kernels/triton_chunk.gated_delta_rule launches it (num_stages: Triton's default).
    return Launch(dict(HV=d["Hv"], GROUP=_group(d), K=K, V=V, BK=dot_block(K), BV=dot_block(V),
                       PREC=chunk_solve_precision(model_dtype), **chunk_operands(model_dtype, K, V)),
                  num_warps=chunk_solve_warps(K, V, model_dtype), num_stages=3,
                  grid=(cdiv(d["T"], CHUNK), d["B"] * d["Hv"]), args=(d["T"],))


GATED_DELTA_RULE_SOLVE = Plugin(
    name="gated_delta_rule_solve", op="nextdeploy::gated_delta_rule (first kernel)",
    doc="Everything the chunked rule computes before it needs the state, every chunk of 64 steps in parallel: "
        "U_v = (I+A)^-1 diag(beta) V and U_k = (I+A)^-1 diag(beta exp(c)) K, with A_ij = beta_i exp(c_i - c_j) "
        "k_i.k_j (j < i), c the cumulative log-decay in the chunk and q, k l2-normalised; the output's "
        "state-independent terms (O_v, Q_s below), the decayed k and the chunk's total decay.",
    inputs=(Tensor("q", ("B", "T", "Hk", "K"), "T", "raw queries (l2-normalised inside)"),
            Tensor("k", ("B", "T", "Hk", "K"), "T", "raw keys (l2-normalised inside)"),
            Tensor("v", ("B", "T", "Hv", "V"), "T", "values"),
            Tensor("g", ("B", "T", "Hv"), "float32", "log-decay per step"),
            Tensor("beta", ("B", "T", "Hv"), "T", "write strength per step")),
    outputs=(Tensor("u", ("B", "Hv", f"{CHUNKS}*{CHUNK}", TERMS), "float32",
                    "per step of the whole chunks (zeros past T), the columns U_v (V), O_v = P U_v (V), U_k (K), "
                    "Q_s = P U_k - q exp(c)/sqrt(K) (K) and k exp(c_last - c) (K), with P the masked intra-chunk "
                    "attention (P_ij = q_i.k_j exp(c_i - c_j) for j <= i)"),
             Tensor("decay", ("B", "Hv", CHUNKS), "float32", "exp(c_last) per chunk")),
    kernel="chunk_solve_entry", scalars=("T",), dynamic=("B", "T"), plan=_solve_plan)


def _scan_plan(d, model_dtype, attrs) -> Launch:
    K, V = d["K"], d["V"]
    # As model/kernels/triton_chunk.gated_delta_rule launches it (its product operands: launch.chunk_operands),
    # over the plugin's float32 buffer.
    scan = chunk_scan_launch(K, V, model_dtype, "float32")
    return Launch(dict(HV=d["Hv"], K=K, V=V, BK=dot_block(K), BV=scan["BV"], PREC=scan["PREC"],
                       FREE=chunk_operands(model_dtype, K, V)["FREE"]),
                  num_warps=scan["num_warps"], num_stages=scan["num_stages"], grid=(d["B"] * d["Hv"],
                  cdiv(V, scan["BV"])), args=(d["N"],))


GATED_DELTA_RULE_SCAN = Plugin(
    name="gated_delta_rule_scan", op="nextdeploy::gated_delta_rule (second kernel)",
    doc="Walks the chunks in order with the [K, V] state S in registers: U = U_v - U_k S and the chunk's outputs "
        "O_v - Q_s S in one product, then the next state exp(c_last) S + (k exp(c_last - c))^T U. Its "
        "outputs cover the solve's whole chunks, in float32: the graph slices the first T steps and casts them to "
        "the model's dtype (nothing here carries T or the model's dtype).",
    inputs=(Tensor("u", ("B", "Hv", f"N*{CHUNK}", TERMS), "float32", "gated_delta_rule_solve's u"),
            Tensor("decay", ("B", "Hv", "N"), "float32", "gated_delta_rule_solve's decay"),
            Tensor("initial_state", ("B", "Hv", "K", "V"), "float32", "state before the first step")),
    outputs=(Tensor("o", ("B", f"N*{CHUNK}", "Hv", "V"), "float32", "outputs, whole chunks"),
             Tensor("final_state", ("B", "Hv", "K", "V"), "float32", "state after the last step")),
    kernel="chunk_scan_entry", scalars=("N",), dynamic=("B", "N"), in_place={"final_state": "initial_state"},
    plan=_scan_plan)


# ---- the fused Gated DeltaNet decode step ----------------------------------------------------------------------

def _decode_plan(d, model_dtype, attrs) -> Launch:
    K, V = d["K"], d["V"]
    bk, bv = next_power_of_2(K), next_power_of_2(V)
    _group(d)      # value heads a multiple of key heads; the kernel derives its group itself
    return Launch(dict(HK=d["Hk"], HV=d["Hv"], K=K, V=V, W=d["W"], BK=bk, BV=bv, EPS=attrs["eps"]),
                  num_warps=decode_warps(K, V), num_stages=3, grid=(d["B"], d["Hv"]), args=(d["T"],))


CONV_DIM = "2*Hk*K+Hv*V"
GATED_DELTANET_DECODE = Plugin(
    name="gated_deltanet_decode", op="nextdeploy::gated_deltanet_decode",
    doc="A whole Gated DeltaNet token mixer for T small steps in one launch: conv update + SiLU, l2-normalised q/k, "
        "g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), the delta-rule update and output, gated RMSNorm. "
        "Row b's state is pool row slots[b]; a negative slot is a padding row (output zero, no state written).",
    inputs=(Tensor("qkvz", ("B", "T", "2*Hk*K+2*Hv*V"), "T", "in_proj_qkvz output, grouped by key head"),
            Tensor("ba", ("B", "T", "2*Hv"), "T", "in_proj_ba output, grouped by key head"),
            Tensor("conv_weight", (CONV_DIM, "W"), "T", "conv1d filters"),
            Tensor("A_log", ("Hv",), "T", "log decay rate"),
            Tensor("dt_bias", ("Hv",), "T", "decay bias"),
            Tensor("norm_weight", ("V",), "T", "gated RMSNorm weight"),
            Tensor("conv_state", ("P", CONV_DIM, "W-1"), "T", "conv state pool"),
            Tensor("recurrent_state", ("P", "Hv", "K", "V"), "float32", "recurrent state pool"),
            Tensor("slots", ("B",), "int32", "pool row of each batch row, negative for padding"),
            Tensor("arrivals", ("B", "Hk"), "int32", "scratch, zero at the first launch; every launch leaves it zero")),
    outputs=(Tensor("o", ("B", "T", "Hv*V"), "T", "gated-normed output, for out_proj"),
             Tensor("conv_state_out", ("P", CONV_DIM, "W-1"), "T", "conv state pool after the steps"),
             Tensor("recurrent_state_out", ("P", "Hv", "K", "V"), "float32", "recurrent state pool after the steps")),
    attributes=(Attribute("eps", float, "gated RMSNorm epsilon"),),
    kernel="gated_deltanet_decode_entry", scalars=("T",), dynamic=("B", "T", "P"),
    in_place={"conv_state_out": "conv_state", "recurrent_state_out": "recurrent_state"}, plan=_decode_plan)


PLUGINS = {p.name: p for p in (CAUSAL_CONV1D, GATED_DELTA_RULE_SOLVE, GATED_DELTA_RULE_SCAN, GATED_DELTANET_DECODE)}


def markdown(plugin: Plugin) -> str:
    """The plugin's README table."""
    rows = [f"#### `{plugin.id}` (version {VERSION})", "", f"{plugin.doc} Contract: `{plugin.op}`.", "",
            "| | name | dims | dtype | |", "|---|---|---|---|---|"]
    for kind, tensors in (("input", plugin.inputs), ("output", plugin.outputs)):
        for t in tensors:
            shared = plugin.in_place.get(t.name)
            note = t.doc + (f"; may be `{shared}`'s buffer" if shared else "")
            rows.append(f"| {kind} | `{t.name}` | [{', '.join(t.dims)}] | {_dtype_text(t.dtype)} | {note} |")
    for a in plugin.attributes:
        rows.append(f"| attribute | `{a.name}` | | {a.type.__name__} | {a.doc} |")
    rows += ["", f"Kernel `plugins/kernels.py:{plugin.kernel}`, called with "
             f"(inputs, int32 {', '.join(plugin.scalars)}, "
             f"outputs); {', '.join(plugin.dynamic)} vary at run time, every other dimension is fixed at build time."]
    return "\n".join(rows)


def _dtype_text(dtype: str) -> str:
    return "model (fp32, fp16, bf16)" if dtype == "T" else dtype
