"""The two kernels as registered torch custom ops, so exported graphs hold one node per kernel call.

`torch.export` sees `nextdeploy::gated_delta_rule` and `nextdeploy::causal_conv1d` (with fake implementations
for shape propagation); every lowering (ONNX Runtime contrib ops, TensorRT plugins, compiled engines) maps these
nodes to its own kernels. Eagerly they run the dispatch in `model.kernels`. The contracts are those of
reference.py, with the state always given.
"""

from __future__ import annotations

import torch

NAMESPACE = "nextdeploy"


@torch.library.custom_op(f"{NAMESPACE}::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from . import run_gated_delta_rule
    o, state = run_gated_delta_rule(q, k, v, g, beta, initial_state)
    return o.contiguous(), state.float().contiguous()


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state):
    B, T, Hv, V = v.shape
    return v.new_empty(B, T, Hv, V), initial_state.new_empty(B, Hv, k.shape[-1], V, dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from . import run_causal_conv1d
    y, new_state = run_causal_conv1d(x, weight, state)
    return y.contiguous(), new_state.to(state.dtype).contiguous()


@causal_conv1d.register_fake
def _(x, weight, state):
    return torch.empty_like(x), torch.empty_like(state)
