"""torch.compile for the training step, one decoder layer at a time (regional compilation).

The layers share their code, so Dynamo traces one linear-attention and one full-attention layer and every
other layer reuses those graphs: compile time stays that of two layers whatever the depth, and a layer is
also the unit that FSDP gathers, whose hooks stay outside the compiled code. Inside a layer the gated delta
rule is the chunked PyTorch reference (batched products over all chunks for a fixed --seq-len), which Inductor
fuses with the norms, gates and projections around it, backward included; its walk over the chunks is the
`nextdeploy::chunk_scan` op and the conv before it `nextdeploy::causal_conv1d_train`, whose Triton kernels (forward
and backward) Inductor calls in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.layers import SparseMoeBlock
from model.model import Qwen3NextForCausalLM


def compile_layers(model: Qwen3NextForCausalLM) -> None:
    """Replace each decoder layer's forward by its compiled version (state dict names are unchanged)."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, SparseMoeBlock):
            # Routed experts take a data-dependent number of tokens each; only the token mixer has fixed shapes.
            mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
            mixer.forward = torch.compile(mixer.forward, fullgraph=True, dynamic=False)
        else:
            layer.forward = torch.compile(layer.forward, fullgraph=True, dynamic=False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32. logits: [B, T, vocab]; targets: [B, T]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# Compiled, the float32 copy of the logits (the largest activation of a small model) is never materialised.
compiled_cross_entropy = torch.compile(cross_entropy, fullgraph=True, dynamic=False)
