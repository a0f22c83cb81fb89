"""The kernels as registered torch ops, so exported graphs hold one node per kernel call.

`torch.export` sees `nextdeploy::gated_delta_rule` and `nextdeploy::causal_conv1d` (with fake implementations
for shape propagation); every lowering (ONNX Runtime contrib ops, TensorRT plugins, compiled engines) maps these
nodes to its own kernels. They are `torch.library.triton_op`s: eagerly they run their body, and Inductor traces
through the body instead of calling it as an opaque Python function, so compiled graphs (and AOTInductor
packages) hold the kernels themselves. The body is the plain reference (traceable for a fixed sequence length).
The contracts are those of reference.py, with the state always given.
"""

from __future__ import annotations

import logging

import torch
from torch.library import triton_op

from . import reference

NAMESPACE = "nextdeploy"
# torch logs a warning whenever a triton_op is defined without Triton installed (CPU-only machines); the
# reference bodies need no Triton.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


def reference_gated_delta_rule(q, k, v, g, beta, initial_state):
    """Token-by-token for short inputs (decode), chunked for long ones (prefill)."""
    if q.shape[1] <= 16:
        return reference.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state)
    return reference.gated_delta_rule_chunked(q, k, v, g, beta, initial_state)


@triton_op(f"{NAMESPACE}::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    o, state = reference_gated_delta_rule(q, k, v, g, beta, initial_state)
    return o.contiguous(), state.float().contiguous()


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state):
    B, T, Hv, V = v.shape
    return v.new_empty(B, T, Hv, V), initial_state.new_empty(B, Hv, k.shape[-1], V, dtype=torch.float32)


@triton_op(f"{NAMESPACE}::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y, new_state = reference.causal_conv1d(x, weight, state)
    return y.contiguous(), new_state.to(state.dtype).contiguous()


@causal_conv1d.register_fake
def _(x, weight, state):
    return torch.empty_like(x), torch.empty_like(state)
