"""Norms, rotary embedding, gated attention, SwiGLU MLP and the sparse MoE block.

Module and parameter names follow transformers' Qwen3NextForCausalLM so state dicts move across unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.attention import sdpa_kernel

from .config import Qwen3NextConfig
from . import kernels
from .kernels.reference import SDPA_BACKENDS, gated_rms_norm, norm_rope, rms_norm


class RMSNorm(nn.Module):
    """Decoder norm: x̂ * (1 + w), computed in float32; weights start at 0 so the norm starts as identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: x̂ * w * silu(z). The weight multiplies in the input dtype, the gate in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the first `rotary_dim` channels of each attention head.

    The inverse frequencies are computed per call in float32 rather than held in a buffer, so casting the
    model to bf16/fp16 cannot round them (a constant under torch.export)."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.theta = config.rope_theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] integer -> cos, sin: [B, T, rotary_dim] in `dtype`."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float32, device=positions.device) / self.dim
        freqs = positions[..., None].float() * (1.0 / self.theta**exponents)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    """Gated full attention: q_proj yields query and a per-channel output gate; q/k RMSNorm; partial RoPE; GQA."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.fused = None   # q, k and v projections as one product, in exported copies (model/fusion.py)

    def forward(self, x, cos, sin, positions=None, key_cache=None, value_cache=None, attend_len=None):
        """x: [B,T,hidden]. Without caches: causal attention over x. With caches ([B,Hkv,S,D], written in place at
        `positions` [B,T]): attention over cache slots [0, attend_len) masked to each query's own position."""
        B, T, _ = x.shape
        q, k, v = self.fused(x) if self.fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        # Each head's slice of q_proj holds [query | gate] for that head.
        q, gate = q.view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(B, T, -1)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        groups = self.num_heads // self.num_kv_heads
        if key_cache is None:
            q = norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps)
            k = norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps).repeat_interleave(groups, dim=1)
            v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
            with sdpa_kernel(SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        else:
            q = kernels.norm_rope_cache(q, k, v, self.q_norm.weight, self.k_norm.weight, cos, sin, positions,
                                        key_cache, value_cache, self.q_norm.eps)
            out = kernels.decode_attention(q, key_cache[:, :, :attend_len], value_cache[:, :, :attend_len], positions)
            out = out.unflatten(2, (groups, T)).permute(0, 3, 1, 2, 4)              # [B, T, Hkv, groups, D]
        out = out.reshape(B, T, -1) * torch.sigmoid(gate)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over experts, top-k, optionally renormalised over the chosen k."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))

    def forward(self, x):
        """x: [N, hidden] -> (weights [N, k] in x's dtype, expert indices [N, k], logits [N, experts]).

        The logits are returned for training's load-balancing loss, which must differentiate through this very
        tensor: a recomputed copy would let that loss's backward run before a sharded layer is gathered again."""
        logits = F.linear(x, self.weight)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts, logits


class Experts(nn.Module):
    """All routed experts as two stacked tensors (transformers 5.x's in-memory layout; per-expert on disk)."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x, weights, experts):
        """x: [N, hidden]; weights, experts: [N, k]. Each token's output is the weighted sum of its k experts."""
        if torch.compiler.is_exporting():
            return self.dense_forward(x, weights, experts)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():
            token, slot = torch.where(experts == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def dense_forward(self, x, weights, experts):
        """Every expert on every token, weighted by the (mostly zero) routing matrix: the same result as the
        sparse loop, without the data-dependent shapes that exported graphs and CUDA graphs cannot hold."""
        routing = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        routing = routing.scatter(1, experts, weights)
        gate, up = torch.einsum("nh,efh->nef", x, self.gate_up_proj).chunk(2, dim=-1)
        y = torch.einsum("nef,ehf->neh", F.silu(gate) * up, self.down_proj)
        return (y * routing[..., None]).sum(dim=1)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts, _ = self.gate(x)
        routed = self.experts(x, weights, experts)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return (routed + shared).reshape(shape)
