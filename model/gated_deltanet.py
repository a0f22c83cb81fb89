"""Gated DeltaNet token mixer (Qwen3-Next's linear-attention layer)."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .config import Qwen3NextConfig
from .kernels.reference import decay_and_beta, split_projections
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
        qkvz, ba = self.fused(x) if self.fused is not None else (self.in_proj_qkvz(x), self.in_proj_ba(x))
        if conv_state is not None and kernels.use_fused_decode(T):
            o = kernels.gated_deltanet_decode(qkvz, ba, self.conv1d.weight[:, 0], self.A_log, self.dt_bias,
                                              self.norm.weight, conv_state, recurrent_state, slots, self.norm.eps)
            return self.out_proj(o)
        _, _, _, z, b, a = split_projections(qkvz, ba, self.num_k_heads, self.head_k_dim, self.head_v_dim)
        mixed, new_conv = kernels.causal_conv1d_grouped(qkvz, self.conv1d.weight[:, 0], conv_state, self.num_k_heads,
                                                        self.head_k_dim)
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
