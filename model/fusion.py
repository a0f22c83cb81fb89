"""One matmul where the model has several over the same input: an export-time rewrite for the compiled engine.

A decode step at small batch is a chain of matrix-vector products, and under a CUDA graph each one costs a launch
(~1.5-3 us) besides its bytes. Gated DeltaNet's qkvz and ba projections, the MLP's gate and up projections and
attention's q, k and v projections each read the same input, so their weights stacked are one product with the
same bytes and a fraction of the launches (`tiny`'s decode step: 51 products become 33).

Checkpoints keep transformers' separate names; only a structural copy made for exporting is rewritten.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .gated_deltanet import GatedDeltaNet
from .layers import MLP, Attention


class FusedLinear(nn.Module):
    """Linear layers over one input as one: the weights stacked along the output dimension, the result split back
    into each layer's output (views of one tensor, last dimension contiguous)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) > 1:
            raise ValueError("cannot fuse linear layers of which only some have a bias")
        self.sizes = [lin.out_features for lin in linears]
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
            self.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False) \
                if has_bias == {True} else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


# Module class -> its projections that share an input, in the order the module's `fused` output unpacks.
FUSIBLE = {
    GatedDeltaNet: ("in_proj_qkvz", "in_proj_ba"),
    Attention: ("q_proj", "k_proj", "v_proj"),
    MLP: ("gate_proj", "up_proj"),
}


def fuse_projections(model: nn.Module) -> nn.Module:
    """A copy of `model` in which every module of FUSIBLE computes its projections as one FusedLinear (its
    `fused`), the separate layers removed. Every other parameter and buffer is shared with `model`, not copied;
    `model` itself is unchanged. For inference only: the fused weights do not train."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fused_model = copy.deepcopy(model, memo=shared)
    for module in fused_model.modules():
        names = FUSIBLE.get(type(module))
        if names is None:
            continue
        module.fused = FusedLinear([getattr(module, name) for name in names])
        for name in names:
            delattr(module, name)
    return fused_model
