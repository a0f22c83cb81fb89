"""Gated DeltaNet token mixer (Qwen3-Next's linear-attention layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import Qwen3NextConfig
from .kernels.reference import decay_and_beta, split_gates, split_projections
from .layers import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim,
                                padding=self.conv_kernel_size - 1, bias=False)
        self.in_proj_qkvz = nn.Linear(config.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(config.hidden_size, 2 * self.num_v_heads, bias=False)
        self.fused = None   # both projections as one product, in exported copies (model/fusion.py)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads).uniform_(0.01, 16).log())
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, config.hidden_size, bias=False)

    def forward(self, x, conv_state=None, recurrent_state=None, slots=None):
        """x: [B,T,hidden]. conv_state [B,conv_dim,W-1] and recurrent_state [B,Hv,K,V] (float32), when given, are
        the states before x and are overwritten in place with the states after it (rows `slots`, default 0..B-1)."""
        B, T, _ = x.shape
        if conv_state is None and self._learning():
            qkv, z = self._ungrouped_projection(x)
            z = z.view(B, T, self.num_v_heads, self.head_v_dim)
            b, a = split_gates(self.in_proj_ba(x), self.num_k_heads)
            mixed, _ = kernels.causal_conv1d(qkv, self.conv1d.weight[:, 0])
        else:
            qkvz, ba = self.fused(x) if self.fused is not None else (self.in_proj_qkvz(x), self.in_proj_ba(x))
            if conv_state is not None and kernels.use_fused_decode(T):
                o = kernels.gated_deltanet_decode(qkvz, ba, self.conv1d.weight[:, 0], self.A_log, self.dt_bias,
                                                  self.norm.weight, conv_state, recurrent_state, slots, self.norm.eps)
                return self.out_proj(o)
            _, _, _, z, b, a = split_projections(qkvz, ba, self.num_k_heads, self.head_k_dim, self.head_v_dim)
            mixed, new_conv = kernels.causal_conv1d_grouped(qkvz, self.conv1d.weight[:, 0], conv_state,
                                                            self.num_k_heads, self.head_k_dim)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(B, T, self.num_k_heads, self.head_k_dim)
        k = k.reshape(B, T, self.num_k_heads, self.head_k_dim)
        v = v.reshape(B, T, self.num_v_heads, self.head_v_dim)
        g, beta = decay_and_beta(a, b, self.A_log, self.dt_bias)
        o, new_recurrent = kernels.gated_delta_rule(q, k, v, g, beta, recurrent_state)
        if conv_state is not None:
            conv_state.copy_(new_conv)
            recurrent_state.copy_(new_recurrent)
        o = self.norm(o.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(o.reshape(B, T, self.value_dim))

    def _learning(self) -> bool:
        """Whether this call is a training step's: gradients wanted, outside torch.export (whose graphs keep the
        checkpoint's layout)."""
        return torch.is_grad_enabled() and self.fused is None and self.in_proj_qkvz.weight.requires_grad and \
            not kernels._exporting()

    def _ungrouped_projection(self, x):
        """The qkvz projection with its output columns as [all q | all k | all v | all z] rather than grouped by key
        head: the weight's rows regrouped each step (a copy of the weight, fused into its cast to the autocast
        dtype), so that the conv reads its input in place and the backward writes the gradients of the conv's input
        and of z as two blocks of columns. Compiled over the grouped layout, the backward gathered both into the
        interleaved columns with nested index arithmetic, one 605 us kernel (201 us now) of a `small` layer's
        training step on an H100 (8 x 2048 tokens; the layer 11.30 -> 10.69 ms). Returns (the conv's input
        [B,T,conv_dim], z [B,T,value_dim]), views of one product."""
        hidden = x.shape[-1]
        rows = self.in_proj_qkvz.weight.view(self.num_k_heads, -1, hidden)
        group_v = self.value_dim // self.num_k_heads
        parts = rows.split([self.head_k_dim, self.head_k_dim, group_v, group_v], dim=1)
        weight = torch.cat([part.reshape(-1, hidden) for part in parts])
        return F.linear(x, weight).split([self.conv_dim, self.value_dim], dim=-1)
