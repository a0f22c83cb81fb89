"""The routers' load-balancing loss for mixture-of-experts models, as transformers trains Qwen3-Next.

transformers adds `router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k)` to the
language-model loss (Switch Transformer, eqs. 4-6): over the tokens of all MoE layers together,
    num_experts * sum_e f_e * P_e,
f_e the number of top-k slots routed to expert e per token and P_e the mean routing probability of e. It is
top_k when routing is uniform and grows as routing concentrates; only P carries gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import Router


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """router_logits: one [tokens, num_experts] tensor per MoE layer -> the scalar loss (float32)."""
    probs = F.softmax(torch.cat(router_logits).float(), dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices.flatten()
    slots = torch.zeros(num_experts, device=probs.device).scatter_add_(0, chosen, torch.ones_like(chosen,
                                                                                                   dtype=probs.dtype))
    return num_experts * (slots / probs.shape[0]) @ probs.mean(dim=0)


class RouterLogits:
    """Keeps every router's logits from the forward passes that build a graph (training), until `take()`.

    They are the routers' own output tensors, not recomputed copies: the loss's gradient then joins the router's
    backward after the layer's, which FSDP needs (it gathers a layer's weights again only for that backward)."""

    def __init__(self, model: nn.Module):
        self.num_experts = model.config.num_experts
        self.top_k = model.config.num_experts_per_tok
        self._logits: list[torch.Tensor] = []
        for module in model.modules():
            if isinstance(module, Router):
                module.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        if torch.is_grad_enabled():
            self._logits.append(output[2])

    def take(self) -> list[torch.Tensor]:
        logits, self._logits = self._logits, []
        return logits

    def loss(self) -> torch.Tensor:
        """The load-balancing loss of the forward passes since the last call."""
        return load_balancing_loss(self.take(), self.num_experts, self.top_k)
