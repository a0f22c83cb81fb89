"""The compiled engine's copy of the model: fewer, larger products. An export-time rewrite.

A decode step at small batch is a chain of matrix-vector products, and under a CUDA graph each launch costs
(~1.5-3 us) about what a small product's bytes do. Two rewrites cut the launches:
- Gated DeltaNet's qkvz and ba projections, the MLP's gate and up projections and attention's q, k and v
  projections each read the same input: their weights stacked are one product (`tiny`'s step: 51 become 33).
- The pointwise work between products joins them (kernels.fused_linear): each decoder RMSNorm runs inside the
  product after it, the MLP's SwiGLU inside the down projection, and each residual add inside the output
  projection before it. For inputs of at most `max_rows` rows on CUDA that is one Triton kernel per product;
  longer inputs (prefill) run cuBLAS's product with the same pointwise ops beside it, as before.

Checkpoints keep transformers' separate names; only a structural copy made for exporting is rewritten, sharing
every weight that is not stacked.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import kernels
from .gated_deltanet import GatedDeltaNet
from .layers import MLP, RMSNorm
from .model import DecoderLayer

# A decode step's products at these many rows or fewer run the fused linear kernel (on CUDA); larger batches run
# cuBLAS, whose tiles pay off once several rows share each weight read. Measured on an H100 (`tiny`, bf16, --pdl,
# a step's CUDA graph replayed back to back): fused 0.110 / 0.144 / 0.191 ms at batch 1 / 4 / 8, cuBLAS 0.151 at
# batch 1 and 0.165 at batch 8; so 4, not 8.
FUSED_LINEAR_MAX_ROWS = 4


class FusedLinear(nn.Module):
    """Linear layers over one input as one: the weights stacked along the output dimension, optionally after the
    decoder RMSNorm `norm` that precedes them. Returns the product split back into each layer's output (views of
    one tensor, last dimension contiguous), or, for one layer, the product itself (`float_output`: in float32 at
    least, see reference.fused_linear)."""

    def __init__(self, linears: list[nn.Linear], norm: RMSNorm | None = None, max_rows: int = 0,
                 float_output: bool = False):
        super().__init__()
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) > 1:
            raise ValueError("cannot fuse linear layers of which only some have a bias")
        self.sizes = [lin.out_features for lin in linears]
        self.norm, self.max_rows, self.float_output = norm, max_rows, float_output
        with torch.no_grad():
            self.weight = linears[0].weight if len(linears) == 1 else \
                nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
            self.bias = None if has_bias == {False} else linears[0].bias if len(linears) == 1 else \
                nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        norm_weight, eps = (self.norm.weight, self.norm.eps) if self.norm is not None else (None, 1e-6)
        y = kernels.fused_linear(x, self.weight, self.bias, norm_weight, eps=eps, float_output=self.float_output,
                                 max_rows=self.max_rows)
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else y


class OutputLinear(nn.Module):
    """A layer's last product with the residual add after it, and for the MLP's down projection the SwiGLU before
    it (x is then the gate)."""

    def __init__(self, linear: nn.Linear, max_rows: int):
        super().__init__()
        self.weight, self.bias, self.max_rows = linear.weight, linear.bias, max_rows

    def forward(self, x, residual=None, up=None):
        return kernels.fused_linear(x, self.weight, self.bias, up=up, residual=residual, max_rows=self.max_rows)


class FusedMLP(nn.Module):
    """SwiGLU MLP as two products: [gate | up] (after the folded `norm`, if any), then down with SwiGLU and the
    residual add."""

    def __init__(self, mlp: MLP, norm: RMSNorm | None, max_rows: int):
        super().__init__()
        self.gate_up = FusedLinear([mlp.gate_proj, mlp.up_proj], norm, max_rows)
        self.down_proj = OutputLinear(mlp.down_proj, max_rows)

    def forward(self, x, residual=None):
        gate, up = self.gate_up(x)
        return self.down_proj(gate, residual, up=up)


class FusedDecoderLayer(nn.Module):
    """DecoderLayer's computation with its norms and residual adds inside its products: the input norm in the token
    mixer's first product, the mixer's output projection (taken out of the mixer) adding the residual, and for a
    dense MLP the post-attention norm and the second residual in the MLP's products."""

    def __init__(self, layer: DecoderLayer, max_rows: int):
        super().__init__()
        self.layer_type = layer.layer_type
        mixer = layer.linear_attn if self.layer_type == "linear_attention" else layer.self_attn
        deltanet = isinstance(mixer, GatedDeltaNet)
        stacked = ("in_proj_qkvz", "in_proj_ba") if deltanet else ("q_proj", "k_proj", "v_proj")
        mixer.fused = FusedLinear([getattr(mixer, name) for name in stacked], layer.input_layernorm, max_rows)
        for name in stacked:
            delattr(mixer, name)
        output = "out_proj" if deltanet else "o_proj"
        self.mixer_output = OutputLinear(getattr(mixer, output), max_rows)
        setattr(mixer, output, nn.Identity())
        self.mixer = mixer
        if isinstance(layer.mlp, MLP):
            self.mlp = FusedMLP(layer.mlp, layer.post_attention_layernorm, max_rows)
            self.post_attention_layernorm = None
        else:   # MoE: the router and the experts read the normed input too; only the shared expert is rewritten
            layer.mlp.shared_expert = FusedMLP(layer.mlp.shared_expert, None, max_rows)
            self.mlp, self.post_attention_layernorm = layer.mlp, layer.post_attention_layernorm

    def forward(self, x, cos, sin, positions=None, layer_state=None, attend_len=None):
        state = layer_state or (None, None)
        if self.layer_type == "linear_attention":
            h = self.mixer(x, *state)
        else:
            h = self.mixer(x, cos, sin, positions, *state, attend_len=attend_len)
        x = self.mixer_output(h, residual=x)
        if self.post_attention_layernorm is None:
            return self.mlp(x, residual=x)
        return x + self.mlp(self.post_attention_layernorm(x))


def fuse_projections(model: nn.Module, max_rows: int = FUSED_LINEAR_MAX_ROWS) -> nn.Module:
    """A copy of `model` with every decoder layer a FusedDecoderLayer and the final norm folded into the LM head,
    whose logits come out in float32.
    Every parameter and buffer not stacked is shared with `model`, not copied; `model` itself is unchanged. For
    inference only: the stacked weights do not train. `max_rows`: see FUSED_LINEAR_MAX_ROWS (0: cuBLAS always)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    fused_model = copy.deepcopy(model, memo=shared)
    decoder = fused_model.model
    decoder.layers = nn.ModuleList(FusedDecoderLayer(layer, max_rows) for layer in decoder.layers)
    # Logits in float32 from the kernel's accumulator: the engine returns them in float32, rounded to bf16 first
    # they would lose ~1e-3 of relative accuracy, and a cast would be a launch of its own.
    fused_model.lm_head = FusedLinear([fused_model.lm_head], decoder.norm, max_rows, float_output=True)
    decoder.norm = nn.Identity()
    return fused_model
