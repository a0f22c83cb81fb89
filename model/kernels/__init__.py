"""The one dispatch point for the model's kernels.

`gated_delta_rule`, `causal_conv1d` (`causal_conv1d_grouped` from a layer's projection), the fused decode step
`gated_deltanet_decode`, `decode_attention` (new tokens over the KV cache), `norm_rope_cache` (a cached attention
layer's q/k norms, rotary embedding and cache writes) and `fused_linear` (a few rows' projection with its norm or
SwiGLU and residual, in the compiled engine's copy of the model: model/fusion.py) keep one contract (see
reference.py) whichever implementation runs: the plain PyTorch reference on CPU (or when forced), the project's own
Triton kernels on CUDA (ops.py: torch.library.triton_ops, visible to torch.export and Inductor), or, for comparison,
fla / causal-conv1d. Select with `use_kernels("auto" | "torch" | "fla")` or the environment variable
NEXT_DEPLOY_KERNELS. Training (autograd) on CUDA runs the chunked rule as the `nextdeploy::gated_delta_rule_train`
op (Triton kernels forward and backward: triton_chunk_train.py) and the conv as the
`nextdeploy::causal_conv1d_train` op (triton_conv.py's forward kernel and its backward one), or with 'torch' the
plain reference, or with 'fla' fla where its backward works and causal-conv1d; the other Triton kernels are
forward-only."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import fast, ops, reference
from .launch import decode_attention_fits

log = logging.getLogger("next_deploy.kernels")

CHOICES = ("auto", "torch", "fla")
# Steps a fused decode call takes (decode, or a few speculative tokens); longer inputs are prefill.
FUSED_DECODE_MAX_STEPS = 16
GPU_TRAINING_CHUNK = 128   # the chunked rule's chunk when training on a GPU (run_gated_delta_rule says why)
_choice = os.environ.get("NEXT_DEPLOY_KERNELS", "auto")
_logged: set[str] = set()
_lowering = None  # while exporting to ONNX: an object whose methods emit the target's nodes for each kernel


@contextmanager
def lowered_to(lowering):
    """Within this block, exported graphs call `lowering.gated_delta_rule` / `lowering.causal_conv1d` (same
    contracts) instead of the custom ops: how an exporter puts its own backend's nodes in the graph. A lowering with
    a `gated_deltanet_decode` method (same contract) also takes the fused decode step."""
    global _lowering
    previous, _lowering = _lowering, lowering
    try:
        yield
    finally:
        _lowering = previous


def use_kernels(choice: str) -> None:
    """'auto': own Triton kernels on CUDA, else the reference; 'torch': always the reference; 'fla': fla and
    causal-conv1d on CUDA where installed (no fused decode step)."""
    global _choice
    if choice not in CHOICES:
        raise ValueError(f"kernels must be one of {CHOICES}, got {choice!r}")
    _choice = choice


def selected() -> str:
    return _choice


def _announce(path: str) -> None:
    # Inside torch.compile a log call would split the graph; the compiling caller says what it traced instead.
    if torch.compiler.is_compiling():
        return
    if path not in _logged:
        _logged.add(path)
        log.info("kernel path: %s", path)


def use_fused_decode(num_steps: int) -> bool:
    """Whether a layer with state runs `num_steps` tokens through the fused decode step: not while lowering to a
    backend that maps only the two kernels (ONNX Runtime), and not when fla is chosen for comparison. A symbolic
    length (a graph exported for any prompt length) takes the general path."""
    return isinstance(num_steps, int) and num_steps <= FUSED_DECODE_MAX_STEPS and _choice != "fla" and \
        (_lowering is None or hasattr(_lowering, "gated_deltanet_decode"))


def _tracing() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def _exporting() -> bool:
    """Whether torch.export is tracing, read from the flag export sets: Dynamo in torch 2.11 answers True for
    torch.compiler.is_exporting() in any torch.compile'd code (later versions read the flag), which put the
    export-only ops, which have no backward, into compiled training steps on the GPU machine."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


def gated_deltanet_decode(qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, slots,
                          eps):
    """The fused decode step: the `nextdeploy::gated_deltanet_decode` op in traced graphs; eagerly its kernel is
    called directly (the op's dispatch costs ~100 us of host time per call)."""
    args = (qkvz, ba, conv_weight, A_log, dt_bias, norm_weight, conv_state, recurrent_state, slots, eps)
    if _tracing():
        return (_lowering or ops).gated_deltanet_decode(*args)
    if ops.use_triton(qkvz, conv_state):
        from . import triton_decode
        _announce("fused decode step: Triton (CUDA)")
        return triton_decode.gated_deltanet_decode(*args)
    _announce("fused decode step: torch reference")
    return reference.gated_deltanet_decode(*args)


def decode_attention(q, key_cache, value_cache, positions):
    """Attention of new tokens over a KV cache (reference.decode_attention's contract). The Triton kernel, which
    reads only the slots in use, runs for the shapes it takes (launch.decode_attention_fits) on CUDA and, as the
    `nextdeploy::decode_attention` op, in exported and compiled graphs, a prefill program's included (any prompt
    length); ONNX lowerings and everything else take the plain masked attention over the given cache.

    Against cuDNN's masked attention over `small`'s 8448-slot cache (H100, bf16, one row; bench.kernels): a 128-token
    chunk 0.018 against 0.53 ms from the start and 0.14 against 0.54 after 8064 tokens; a 2048-token chunk 0.26
    against 1.39 ms from the start, 1.06 against 1.36 after 4096 tokens, and only after 6144 slightly slower (1.46
    against 1.41), as its blocks of 16 query rows each read the whole context."""
    fits = decode_attention_fits(q.shape[3]) and _choice != "fla"
    if _tracing():
        if fits and _lowering is None:
            return ops.decode_attention(q, key_cache, value_cache, positions)
    elif fits and ops.use_triton(q, key_cache, value_cache) and not _needs_grad(q, key_cache, value_cache):
        from . import triton_attention
        _announce("decode attention: Triton (CUDA)")
        return triton_attention.decode_attention(q, key_cache, value_cache, positions)
    return reference.decode_attention(q, key_cache, value_cache, positions)


def fused_linear(x, weight, bias=None, norm_weight=None, up=None, residual=None, eps: float = 1e-6,
                 float_output: bool = False, max_rows: int = 0):
    """A linear layer with its prologue (RMSNorm or SwiGLU) and epilogue (bias, residual): reference.fused_linear's
    contract. Inputs of at most `max_rows` rows take the Triton kernel on CUDA, and in exported and compiled graphs
    the `nextdeploy::fused_linear` op decides by the rows of the shape it is compiled for; ONNX lowerings and
    everything else take the reference (cuBLAS's product beside the pointwise work)."""
    args = (x, weight, bias, norm_weight, up, residual, eps, float_output)
    if _tracing():
        if _lowering is None:
            return ops.fused_linear(*args, max_rows)
    elif x.numel() <= max_rows * x.shape[-1] and ops.use_triton(x, weight) and not _needs_grad(x, weight):
        from . import triton_linear
        _announce("fused linear: Triton (CUDA)")
        return triton_linear.fused_linear(*args)
    return reference.fused_linear(*args)


def norm_rope_cache(q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, eps):
    """A cached attention layer's q/k norms, rotary embedding and cache writes (reference.norm_rope_cache's
    contract): one Triton kernel on CUDA and, as the `nextdeploy::norm_rope_cache` op, in exported and compiled
    graphs of a fixed number of steps; ONNX lowerings, graphs for any prompt length and everything else take the
    reference."""
    args = (q, k, v, q_norm_weight, k_norm_weight, cos, sin, positions, key_cache, value_cache, eps)
    if _tracing():
        if isinstance(q.shape[1], int) and _lowering is None and _choice != "fla":
            return ops.norm_rope_cache(*args)
    elif ops.use_triton(q, k, v, key_cache, value_cache) and not _needs_grad(q, k, v):
        from . import triton_rope_cache
        _announce("attention norms, rotary and cache writes: Triton (CUDA)")
        return triton_rope_cache.norm_rope_cache(*args)
    return reference.norm_rope_cache(*args)


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """The gated delta rule; while exporting, the `nextdeploy::gated_delta_rule` custom op."""
    if _exporting():
        if initial_state is None:
            B, _, Hv, V = v.shape
            initial_state = torch.zeros(B, Hv, k.shape[-1], V, dtype=torch.float32, device=v.device)
        return (_lowering or ops).gated_delta_rule(q, k, v, g, beta, initial_state)
    return run_gated_delta_rule(q, k, v, g, beta, initial_state)


def causal_conv1d(x, weight, state=None):
    """Causal conv1d + SiLU; while exporting, the `nextdeploy::causal_conv1d` custom op."""
    if _exporting():
        return (_lowering or ops).causal_conv1d(x, weight, _given_or_zero(state, x, weight))
    return run_causal_conv1d(x, weight, state)


def causal_conv1d_grouped(qkvz, weight, state, num_k_heads: int, head_k_dim: int):
    """causal_conv1d over the q, k and v columns of a Gated DeltaNet projection qkvz (grouped by key head; the
    conv's channels are [all q | all k | all v]). The Triton kernel and the `nextdeploy::causal_conv1d_grouped` op
    read the columns in place; lowerings and the other kernels take causal_conv1d of their concatenation. (A
    training step projects ungrouped columns and takes causal_conv1d of them: GatedDeltaNet._ungrouped_projection.)"""
    if _exporting():
        if _lowering is None:
            return ops.causal_conv1d_grouped(qkvz, weight, _given_or_zero(state, qkvz, weight), num_k_heads,
                                             head_k_dim)
    elif _choice == "auto" and ops.use_triton(qkvz, weight) and not _needs_grad(qkvz, weight):
        _announce("causal conv1d: Triton (CUDA), reading the projection in place")
        from . import triton_conv
        return triton_conv.causal_conv1d_grouped(qkvz, weight.to(qkvz.dtype), _given_or_zero(state, qkvz, weight),
                                                 num_k_heads, head_k_dim)
    return causal_conv1d(reference.conv_input(qkvz, num_k_heads, head_k_dim), weight, state)


def _given_or_zero(state, x, weight):
    """The conv state, or zeros [B, C, W-1] where none is given (the op and the kernel always take one)."""
    return state if state is not None else x.new_zeros(x.shape[0], weight.shape[0], weight.shape[-1] - 1)


def _given_state(state, k, v):
    """The recurrent state a rule starts from: `state`, or zeros [B, Hv, K, V] in float32."""
    if state is not None:
        return state
    return torch.zeros(v.shape[0], v.shape[2], k.shape[-1], v.shape[-1], dtype=torch.float32, device=v.device)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """q, k: [B,T,Hk,K] (raw; l2-normalised inside); v: [B,T,Hv,V]; g: [B,T,Hv] log-decay; beta: [B,T,Hv].

    Returns (o [B,T,Hv,V], final state [B,Hv,K,V] float32).
    """
    training = _needs_grad(q, k, v, g, beta)
    if training and q.is_cuda and _choice == "auto" and ops.HAVE_TRITON and v.dtype != torch.float64:
        _announce("gated delta rule: chunked, Triton kernels forward and backward (GPU training)")
        return ops.gated_delta_rule_train(q, k, v, g, beta, _given_state(initial_state, k, v))[:2]
    if q.is_cuda and fast.HAVE_FLA and _choice == "fla":
        if not training or fast.FLA_BACKWARD_WORKS:
            _announce("gated delta rule: fla (CUDA)")
            return fast.gated_delta_rule(q, k, v, g, beta, initial_state)
        _announce("gated delta rule: torch reference for training (fla's backward is disabled on Hopper with "
                  "this Triton; install tilelang or Triton >= 3.7.1 to train with fla)")
    elif not training and ops.use_triton(v, q, k):
        _announce("gated delta rule: Triton (CUDA)")
        from . import triton_chunk
        return triton_chunk.gated_delta_rule(q, k, v, g, beta, _given_state(initial_state, k, v))
    if training and q.is_cuda:
        # The plain PyTorch rule (--kernels torch): chunks of 128, half the sequential chunk steps of 64, each a few
        # small products launched from the host (small's compiled training step on an H100: 370 -> 290 ms; 256
        # fails in Inductor's cumsum codegen). On CPUs 64 is faster (tiny: 600 against 700 ms a step).
        _announce(f"gated delta rule: torch reference, chunks of {GPU_TRAINING_CHUNK} (GPU training)")
        return reference.gated_delta_rule_chunked(q, k, v, g, beta, initial_state, chunk_size=GPU_TRAINING_CHUNK)
    _announce("gated delta rule: torch reference (recurrent for short inputs, chunked for long)")
    return ops.reference_gated_delta_rule(q, k, v, g, beta, initial_state)


def run_causal_conv1d(x, weight, state=None):
    """x: [B,T,C]; weight: [C,W]; state: [B,C,W-1] or None. Returns (silu(conv) [B,T,C], new state)."""
    training = _needs_grad(x, weight)
    if training and state is None and x.is_cuda and _choice == "auto" and ops.HAVE_TRITON and \
            x.dtype != torch.float64:
        _announce("causal conv1d: Triton forward and backward (GPU training)")
        return ops.causal_conv1d_train(x, weight), _last_inputs(x, weight)
    if x.is_cuda and fast.HAVE_CAUSAL_CONV1D and x.dtype != torch.float64 and _choice == "fla":
        _announce("causal conv1d: causal-conv1d (CUDA)")
        return fast.causal_conv1d(x, weight, state)
    if not training and ops.use_triton(x, weight):
        _announce("causal conv1d: Triton (CUDA)")
        from . import triton_conv
        return triton_conv.causal_conv1d(x, weight.to(x.dtype), _given_or_zero(state, x, weight))
    _announce("causal conv1d: torch reference")
    return reference.causal_conv1d(x, weight, state)


def _last_inputs(x, weight):
    """The conv state after x from no state, as reference.causal_conv1d returns it: x's last W-1 inputs (zeros
    before x), [B, C, W-1] in the weight's dtype."""
    width = weight.shape[-1]
    tail = x[:, -(width - 1):]
    return F.pad(tail, (0, 0, width - 1 - tail.shape[1], 0)).transpose(1, 2).to(weight.dtype)
