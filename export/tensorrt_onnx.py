"""--target tensorrt, the ONNX half: the step as two ONNX graphs whose recurrent nodes are the TensorRT plugins.

    tensorrt/prefill.onnx   T >= 2 tokens per row: causal_conv1d, gated_delta_rule_solve and gated_delta_rule_scan
    tensorrt/decode.onnx    one token per row: gated_deltanet_decode, the fused step, once per DeltaNet layer

Everything else is standard ONNX, and the state tensors are explicit inputs and `present.*` outputs, as in the
onnxruntime target. A plugin node has op_type = the plugin's name, domain = its namespace, and the attributes
TensorRT's parser reads (plugin_namespace, plugin_version, aot=1) besides the plugin's own; each file also holds
the plugins' ONNX function bodies (plugins/functions.py), which ONNX Runtime runs in their place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.onnx.ops import symbolic_multi_out

from model import Qwen3NextForCausalLM
from model.kernels.reference import decode_heads
from plugins import NAMESPACE, PLUGINS, VERSION
from plugins.functions import functions

from . import build
from .tensorrt import DIRECTORY, GRAPHS

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int32": torch.int32}


def node_attributes(plugin, attrs: dict | None = None) -> dict:
    """What a plugin node carries: TensorRT's parser attributes, then the plugin's own."""
    return {"plugin_namespace": NAMESPACE, "plugin_version": VERSION, "aot": 1, **(attrs or {})}


def _plugin(name: str, inputs: list[torch.Tensor], attrs: dict | None = None) -> list[torch.Tensor]:
    """One plugin node in the traced graph, its output shapes and dtypes from the plugin's description."""
    plugin = PLUGINS[name]
    model_dtype = str(inputs[0].dtype).removeprefix("torch.")
    input_dtypes, output_dtypes = plugin.dtypes(model_dtype)
    inputs = [t.to(TORCH_DTYPES[d]) for t, d in zip(inputs, input_dtypes)]
    shapes = plugin.output_shapes(plugin.bind([tuple(t.shape) for t in inputs]))
    return symbolic_multi_out(f"{NAMESPACE}::{name}", inputs, node_attributes(plugin, attrs),
                              dtypes=[TORCH_DTYPES[d] for d in output_dtypes], shapes=[list(s) for s in shapes],
                              version=int(VERSION))


class TensorRTLowering:
    """The kernels as plugin nodes, while torch.onnx.export traces (model.kernels.lowered_to)."""

    @staticmethod
    def causal_conv1d(x, weight, state):
        return tuple(_plugin("causal_conv1d", [x, weight, state]))

    @staticmethod
    def gated_delta_rule(q, k, v, g, beta, initial_state):
        u, decay = _plugin("gated_delta_rule_solve", [q, k, v, g, beta])
        o, final_state = _plugin("gated_delta_rule_scan", [u, decay, initial_state])
        # The scan covers whole chunks in float32: the op's output is the first T steps in v's dtype.
        return o[:, :v.shape[1]].to(v.dtype), final_state

    @staticmethod
    def gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state,
                              slots, eps):
        Hk = decode_heads(conv_weight, A_log, norm_weight, recurrent_state)[0]
        if slots is None:     # the plugin's contract names the state rows: here rows 0..B-1
            slots = torch.arange(qkvz.shape[0], dtype=torch.int32, device=qkvz.device)
        # The kernel's arrival counters: zero here, and every launch leaves them zero.
        arrivals = torch.zeros(qkvz.shape[0], Hk, dtype=torch.int32, device=qkvz.device)
        o, new_conv, new_state = _plugin("gated_deltanet_decode", [qkvz, ba, conv_weight, A_log, dt_bias, norm_weight,
                                                                   conv_state, recurrent_state, slots, arrivals],
                                         {"eps": float(eps)})
        conv_state.copy_(new_conv)
        recurrent_state.copy_(new_state)
        return o


def model_dims(config) -> dict:
    """The dimensions the function bodies are built for."""
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    K, V = config.linear_key_head_dim, config.linear_value_head_dim
    return dict(C=2 * Hk * K + Hv * V, W=config.linear_conv_kernel_dim, Hk=Hk, Hv=Hv, K=K, V=V)


def in_place_states(graph, state_names: list[str]) -> list[str]:
    """State tensors that can share one buffer between input and `present.` output: read by nothing but the plugin
    input that may share its buffer with the plugin output which is the present tensor. Everything else (KV caches,
    lengths) may be read after its present tensor is written, so it needs a buffer of its own."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        if node.op_type == "Shape" and node.domain == "":
            continue      # reads no data
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    shared = []
    for name in state_names:
        uses = consumers.get(name, [])
        if len(uses) != 1 or uses[0][0].domain != NAMESPACE:
            continue
        node, index = uses[0]
        plugin = PLUGINS[node.op_type]
        outputs = [out for out, source in plugin.in_place.items() if source == plugin.inputs[index].name]
        if outputs and node.output[[t.name for t in plugin.outputs].index(outputs[0])] == f"present.{name}":
            shared.append(name)
    return shared


def export_graphs(model: Qwen3NextForCausalLM, out: Path, max_batch: int, max_seq_len: int, opset: int) -> dict:
    """Write tensorrt/prefill.onnx and tensorrt/decode.onnx; return their files and facts for the manifest."""
    import onnx

    (out / DIRECTORY).mkdir(exist_ok=True)
    external = build.needs_external_data(model)
    state_names = model.new_state(1, 2).names()
    files, in_place, plugin_nodes = {}, {}, {}
    for role, decode in GRAPHS.items():
        proto = build.trace_onnx(model, TensorRTLowering, max_batch, max_seq_len, opset, decode).model_proto
        used = sorted({n.op_type for n in proto.graph.node if n.domain == NAMESPACE})
        proto.functions.extend(functions(model_dims(model.config), opset, used))
        if not any(o.domain == NAMESPACE for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid(NAMESPACE, int(VERSION)))
        files[role] = f"{DIRECTORY}/{role}.onnx"
        path = out / files[role]
        onnx.save_model(proto, str(path), save_as_external_data=external, location=f"{role}.onnx.data")
        if external:
            files[f"{role}_weights"] = f"{DIRECTORY}/{role}.onnx.data"
        onnx.checker.check_model(str(path), full_check=False)
        in_place[role] = in_place_states(proto.graph, state_names)
        plugin_nodes[role] = sum(n.domain == NAMESPACE for n in proto.graph.node)
    return {"files": files, "opset": opset, "plugins": {p: PLUGINS[p].id for p in PLUGINS}, "in_place": in_place,
            "plugin_nodes": plugin_nodes}
