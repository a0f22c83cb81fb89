"""The kernels as registered torch ops, so exported graphs hold one node per kernel call.

`nextdeploy::gated_delta_rule`, `nextdeploy::causal_conv1d` (and `causal_conv1d_grouped`, the same conv reading a
projection's q, k and v columns in place), the fused decode step `nextdeploy::gated_deltanet_decode` (which updates
its state pools in place) and `nextdeploy::decode_attention` (a few new tokens attending to the KV cache's slots in
use) have fake implementations for shape propagation; every lowering (ONNX Runtime contrib ops, TensorRT plugins,
compiled engines) maps the recurrent ones to its own kernels, and the ONNX lowerings export decode attention as
plain attention. They are `torch.library.triton_op`s: eagerly they run their body, and Inductor traces through the
body instead of calling opaque Python, so compiled graphs and AOTInductor packages hold the kernels themselves. The
body launches the Triton kernels (triton_*.py) on CUDA and runs the plain reference elsewhere (traceable for a fixed
sequence length). The contracts are those of reference.py, with the state always given.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from . import reference

NAMESPACE = "nextdeploy"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# torch logs a warning whenever a triton_op is defined without Triton installed (CPU-only machines); the
# reference bodies need no Triton.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Own Triton kernels: CUDA tensors of a dtype they support, Triton installed, not forced to the reference."""
    from . import selected
    return (HAVE_TRITON and selected() == "auto" and all(t.is_cuda for t in tensors)
            and tensors[0].dtype in (torch.float32, torch.bfloat16, torch.float16))


def reference_gated_delta_rule(q, k, v, g, beta, initial_state):
    """Token-by-token for short inputs (decode), chunked for long ones (prefill)."""
    if q.shape[1] <= 16:
        return reference.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state)
    return reference.gated_delta_rule_chunked(q, k, v, g, beta, initial_state)


@triton_op(f"{NAMESPACE}::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(v, q, k):
        from . import triton_chunk
        return triton_chunk.gated_delta_rule(q, k, v, g, beta, initial_state, launch=wrap_triton)
    o, state = reference_gated_delta_rule(q, k, v, g, beta, initial_state)
    return o.contiguous(), state.float().contiguous()


@gated_delta_rule.register_fake
def _(q, k, v, g, beta, initial_state):
    B, T, Hv, V = v.shape
    return v.new_empty(B, T, Hv, V), initial_state.new_empty(B, Hv, k.shape[-1], V, dtype=torch.float32)


def _training_kernels(*tensors: torch.Tensor) -> bool:
    """The training ops' kernels: CUDA tensors, Triton installed, not float64. Unlike the other ops' kernels these
    run whichever kernels are selected, since only training uses these ops and their plain alternative is the
    reference's own computation (kernels/__init__.py picks the op)."""
    return HAVE_TRITON and all(t.is_cuda for t in tensors) and tensors[0].dtype != torch.float64


@triton_op(f"{NAMESPACE}::gated_delta_rule_train", mutates_args=())
def gated_delta_rule_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           initial_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPU training's gated delta rule: (o, final state) as gated_delta_rule's, then what its backward reads
    (triton_chunk_train.gated_delta_rule_forward). CUDA only (kernels/__init__.py picks it)."""
    from . import triton_chunk_train
    return triton_chunk_train.gated_delta_rule_forward(q, k, v, g, beta, initial_state, launch=wrap_triton)


@gated_delta_rule_train.register_fake
def _(q, k, v, g, beta, initial_state):
    from .launch import CHUNK, chunk_buffer_dtype
    B, T, Hv, V = v.shape
    K, n = k.shape[-1], -(-T // CHUNK)
    buffer = getattr(torch, chunk_buffer_dtype(str(v.dtype).removeprefix("torch."), K, V))
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(B, T, Hv, V), v.new_empty(B, Hv, K, V, **f32), v.new_empty(B, Hv, n * CHUNK, 3 * K,
                                                                                    dtype=buffer),
            v.new_empty(B, Hv, n, **f32), v.new_empty(B, Hv, n, K, V, **f32), v.new_empty(B, Hv, n * CHUNK, 2 * V,
                                                                                          **f32))


@triton_op(f"{NAMESPACE}::gated_delta_rule_train_backward", mutates_args=())
def gated_delta_rule_train_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                    beta: torch.Tensor, w: torch.Tensor, decay: torch.Tensor, states: torch.Tensor,
                                    y: torch.Tensor, d_o: torch.Tensor, d_final: torch.Tensor
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    from . import triton_chunk_train
    return triton_chunk_train.gated_delta_rule_backward(q, k, v, g, beta, w, decay, states, y, d_o, d_final,
                                                        launch=wrap_triton)


@gated_delta_rule_train_backward.register_fake
def _(q, k, v, g, beta, w, decay, states, y, d_o, d_final):
    return (*(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, g, beta)),
            torch.empty_like(d_final, dtype=torch.float32))


def _save_for_rule_backward(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[2:])    # kept for the backward only
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:5], *output[2:])
    ctx.state_dtype = inputs[5].dtype


def _rule_backward(ctx, d_o, d_final, *_):
    q, k, v, g, beta, w, decay, states, y = ctx.saved_tensors
    d_o = torch.zeros_like(v) if d_o is None else d_o
    d_final = torch.zeros_like(states[:, :, 0]) if d_final is None else d_final
    *grads, d_state = gated_delta_rule_train_backward(q, k, v, g, beta, w, decay, states, y, d_o, d_final)
    return (*grads, d_state.to(ctx.state_dtype))


torch.library.register_autograd(f"{NAMESPACE}::gated_delta_rule_train", _rule_backward,
                                setup_context=_save_for_rule_backward)


@triton_op(f"{NAMESPACE}::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x, weight, state):
        from . import triton_conv
        return triton_conv.causal_conv1d(x, weight, state, launch=wrap_triton)
    y, new_state = reference.causal_conv1d(x, weight, state)
    return y.contiguous(), new_state.to(state.dtype).contiguous()


@causal_conv1d.register_fake
def _(x, weight, state):
    return torch.empty_like(x), torch.empty_like(state)


@triton_op(f"{NAMESPACE}::causal_conv1d_grouped", mutates_args=())
def causal_conv1d_grouped(qkvz: torch.Tensor, weight: torch.Tensor, state: torch.Tensor, num_k_heads: int,
                          head_k_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(qkvz, weight, state):
        from . import triton_conv
        return triton_conv.causal_conv1d_grouped(qkvz, weight, state, num_k_heads, head_k_dim, launch=wrap_triton)
    y, new_state = reference.causal_conv1d_grouped(qkvz, weight, state, num_k_heads, head_k_dim)
    return y.contiguous(), new_state.to(state.dtype).contiguous()


@causal_conv1d_grouped.register_fake
def _(qkvz, weight, state, num_k_heads, head_k_dim):
    return qkvz.new_empty(*qkvz.shape[:2], weight.shape[0]), torch.empty_like(state)


def _conv_from_no_state(x, weight):
    return reference.causal_conv1d(x, weight)[0]


@triton_op(f"{NAMESPACE}::causal_conv1d_train", mutates_args=())
def causal_conv1d_train(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """reference.causal_conv1d's output from no state, with a backward of its own: GPU training's conv."""
    if _training_kernels(x, weight):
        from . import triton_conv
        state = x.new_zeros(x.shape[0], weight.shape[0], weight.shape[-1] - 1)
        return triton_conv.causal_conv1d(x, weight, state, launch=wrap_triton)[0]
    return _conv_from_no_state(x, weight).contiguous()


@triton_op(f"{NAMESPACE}::causal_conv1d_train_backward", mutates_args=())
def causal_conv1d_train_backward(x: torch.Tensor, weight: torch.Tensor,
                                 dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _training_kernels(x, weight, dy):
        from . import triton_conv
        dx, dweight = triton_conv.causal_conv1d_backward(x, weight, dy, launch=wrap_triton)
        return dx, dweight.to(weight.dtype)
    # Autograd does not record below the op's dispatch; torch.func's transform does.
    _, vjp = torch.func.vjp(_conv_from_no_state, x, weight)
    return tuple(d.contiguous() for d in vjp(dy.to(x.dtype)))


@causal_conv1d_train.register_fake
def _(x, weight):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@causal_conv1d_train_backward.register_fake
def _(x, weight, dy):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _save_for_conv_backward(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _conv_backward(ctx, dy):
    return causal_conv1d_train_backward(*ctx.saved_tensors, dy)


torch.library.register_autograd(f"{NAMESPACE}::causal_conv1d_train", _conv_backward,
                                setup_context=_save_for_conv_backward)


@triton_op(f"{NAMESPACE}::gated_deltanet_decode", mutates_args={"conv_state", "recurrent_state"})
def gated_deltanet_decode(qkvz: torch.Tensor, ba: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor,
                          dt_bias: torch.Tensor, norm_weight: torch.Tensor, conv_state: torch.Tensor,
                          recurrent_state: torch.Tensor, slots: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    if use_triton(qkvz, ba, conv_state, recurrent_state):
        from . import triton_decode
        return triton_decode.gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                                                   recurrent_state, slots, eps, launch=wrap_triton)
    return reference.gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state,
                                           recurrent_state, slots, eps)


@gated_deltanet_decode.register_fake
def _(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, slots, eps):
    B, T, _ = qkvz.shape
    return qkvz.new_empty(B, T, A_log.shape[0] * norm_weight.shape[0])


@triton_op(f"{NAMESPACE}::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    if use_triton(q, key_cache, value_cache):
        from . import triton_attention
        return triton_attention.decode_attention(q, key_cache, value_cache, positions, launch=wrap_triton)
    return reference.decode_attention(q, key_cache, value_cache, positions).contiguous()


@decode_attention.register_fake
def _(q, key_cache, value_cache, positions):
    return torch.empty_like(q)


@triton_op(f"{NAMESPACE}::fused_linear", mutates_args=())
def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 norm_weight: Optional[torch.Tensor], up: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                 eps: float, float_output: bool, max_rows: int) -> torch.Tensor:
    # The row count is fixed when a graph is compiled for one shape: a decode step's few rows take the kernel, the
    # rows of a prefill chunk (or of a graph for any batch) the reference, whose product is cuBLAS's.
    rows = x.numel() // x.shape[-1]
    if isinstance(rows, int) and rows <= max_rows and use_triton(x, weight):
        from . import triton_linear
        return triton_linear.fused_linear(x, weight, bias, norm_weight, up, residual, eps, float_output,
                                          launch=wrap_triton)
    return reference.fused_linear(x, weight, bias, norm_weight, up, residual, eps, float_output).contiguous()


@fused_linear.register_fake
def _(x, weight, bias, norm_weight, up, residual, eps, float_output, max_rows):
    dtype = torch.promote_types(x.dtype, torch.float32) if float_output else x.dtype
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=dtype)


@triton_op(f"{NAMESPACE}::norm_rope_cache", mutates_args={"key_cache", "value_cache"})
def norm_rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor,
                    k_norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                    key_cache: torch.Tensor, value_cache: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(q, k, v, key_cache, value_cache):
        from . import triton_rope_cache
        return triton_rope_cache.norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions,
                                                 key_cache, value_cache, eps, launch=wrap_triton)
    return reference.norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache,
                                     value_cache, eps).contiguous()


@norm_rope_cache.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, eps):
    B, T, H, D = q.shape
    return q.new_empty(B, k.shape[2], H // k.shape[2] * T, D)
