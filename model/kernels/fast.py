"""CUDA kernels from flash-linear-attention (fla) and causal-conv1d, wrapped to the reference op contracts."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
except ImportError:  # the `gpu` extra is not installed
    chunk_gated_delta_rule = fused_recurrent_gated_delta_rule = None

try:
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
except ImportError:
    causal_conv1d_fn = causal_conv1d_update = None

HAVE_FLA = chunk_gated_delta_rule is not None
HAVE_CAUSAL_CONV1D = causal_conv1d_fn is not None


def _fla_backward_works() -> bool:
    """fla 0.6 refuses the backward of its gated chunk kernel on Hopper with Triton >= 3.4, < 3.7.1 (a Triton
    miscompile, fla issue #640) unless tilelang is installed. Ask fla's own flags rather than guess."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return True
    if importlib.util.find_spec("tilelang") is not None:
        return True
    return not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


FLA_BACKWARD_WORKS = HAVE_FLA and _fla_backward_works()


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """fla kernels; same contract as reference.gated_delta_rule_recurrent (state fp32 [B,Hv,K,V])."""
    if initial_state is not None:
        initial_state = initial_state.float()
    # Every argument after v by keyword: fla's positional order (g, gk, gv, beta) differs between entry points.
    kernel = fused_recurrent_gated_delta_rule if q.shape[1] == 1 else chunk_gated_delta_rule
    o, state = kernel(q, k, v, g=g.float(), beta=beta.to(q.dtype), initial_state=initial_state,
                      output_final_state=True, use_qk_l2norm_in_kernel=True)
    return o, state


def causal_conv1d(x, weight, state=None):
    """causal-conv1d kernels; same contract as reference.causal_conv1d."""
    B, T, C = x.shape
    width = weight.shape[-1]
    weight = weight.to(x.dtype)
    if state is None:
        # Training and stateless prefill: the kernel's plain (autograd-supported) form; the new state is just
        # the last width-1 inputs, zero-padded on the left when x is shorter.
        y = causal_conv1d_fn(x.transpose(1, 2), weight, None, activation="silu")
        new_state = F.pad(x.transpose(1, 2), (width - 1, 0))[:, :, T:]
        return y.transpose(1, 2), new_state
    if T == 1:
        new_state = state.to(x.dtype).clone()  # the kernel updates the state in place; the contract returns a new one
        y = causal_conv1d_update(x[:, 0], new_state, weight, None, "silu")
        return y[:, None], new_state
    # The kernel takes [B,C,T] with channels contiguous (x.transpose gives exactly that), and states likewise.
    initial = state.to(x.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    final = torch.empty(B, width - 1, C, dtype=x.dtype, device=x.device).transpose(1, 2)
    y = causal_conv1d_fn(x.transpose(1, 2), weight, None, initial_states=initial,
                         return_final_states=True, final_states_out=final, activation="silu")
    if isinstance(y, tuple):
        y = y[0]
    return y.transpose(1, 2), final.contiguous()
