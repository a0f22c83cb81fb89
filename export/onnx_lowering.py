"""The two kernels as ONNX Runtime contrib nodes (com.microsoft), emitted while torch.onnx.export traces.

CPU and CUDA: `LinearAttention` (update_rule gated_delta) and `CausalConvWithState`. LinearAttention shares each
KV head across query heads, the reverse of Qwen3-Next's grouping, so q and k are l2-normalised and repeated up to
the value-head count first. CUDA only: `GatedDeltaNet`, which takes Qwen3-Next's grouping directly and normalises
q/k itself, with a V-major state ([B, Hv, V, K]) that is transposed at the boundary.
"""

from __future__ import annotations

import torch
from torch.onnx.ops import symbolic_multi_out

from model.kernels.reference import l2_normalize

DOMAIN = "com.microsoft"


def causal_conv1d(x, weight, state):
    """x [B,T,C], weight [C,W], state [B,C,W-1] -> CausalConvWithState over channels-first activations."""
    y, new_state = symbolic_multi_out(
        f"{DOMAIN}::CausalConvWithState", [x.transpose(1, 2), weight[:, None, :], None, state],
        {"activation": "silu"}, dtypes=[x.dtype, state.dtype],
        shapes=[[x.shape[0], x.shape[2], x.shape[1]], list(state.shape)], version=1)
    return y.transpose(1, 2), new_state


class LinearAttentionLowering:
    """For the CPU (and CUDA) execution providers. The recurrence runs in float32 whatever the model dtype."""

    causal_conv1d = staticmethod(causal_conv1d)

    @staticmethod
    def gated_delta_rule(q, k, v, g, beta, initial_state):
        B, T, Hk, K = q.shape
        Hv, V = v.shape[2], v.shape[3]
        q, k = (l2_normalize(x.float()).repeat_interleave(Hv // Hk, dim=2).reshape(B, T, Hv * K) for x in (q, k))
        o, state = symbolic_multi_out(
            f"{DOMAIN}::LinearAttention",
            [q, k, v.float().reshape(B, T, Hv * V), initial_state.float(), g.float(), beta.float()],
            {"q_num_heads": Hv, "kv_num_heads": Hv, "update_rule": "gated_delta", "scale": K**-0.5},
            dtypes=[torch.float32, torch.float32], shapes=[[B, T, Hv * V], [B, Hv, K, V]], version=1)
        return o.reshape(B, T, Hv, V).to(v.dtype), state


class GatedDeltaNetLowering:
    """CUDA execution provider only: one fused node per layer (l2 norm inside, state V-major)."""

    causal_conv1d = staticmethod(causal_conv1d)

    @staticmethod
    def gated_delta_rule(q, k, v, g, beta, initial_state):
        B, T, Hk, K = q.shape
        Hv, V = v.shape[2], v.shape[3]
        o, state = symbolic_multi_out(
            f"{DOMAIN}::GatedDeltaNet",
            [q, k, v, None, g.float(), beta.float(), initial_state.float().transpose(2, 3).contiguous()],
            {"qk_l2_norm": 1, "update_rule": "gated_delta", "scale": K**-0.5},
            dtypes=[v.dtype, torch.float32], shapes=[[B, T, Hv, V], [B, Hv, V, K]], version=1)
        return o, state.transpose(2, 3)


LOWERINGS = {"LinearAttention": LinearAttentionLowering, "GatedDeltaNet": GatedDeltaNetLowering}
# On an H100 (tiny preset, float32, ONNX Runtime 1.31) LinearAttention decoded in 3.61 / 4.47 ms per token at
# batch 1 / 8 against GatedDeltaNet's 4.01 / 4.63, so it is the default on CUDA too.
DEFAULT_OP = {"cpu": "LinearAttention", "cuda": "LinearAttention"}
