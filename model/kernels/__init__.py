"""The one dispatch point for the model's two recurrent kernels.

`gated_delta_rule` and `causal_conv1d` keep one contract (see reference.py) whichever implementation runs:
the plain PyTorch reference on CPU (or when forced), fla / causal-conv1d on CUDA when they are importable.
Select with `use_kernels("auto" | "torch")` or the environment variable NEXT_DEPLOY_KERNELS.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

from . import fast, ops, reference

log = logging.getLogger("next_deploy.kernels")

_CHOICES = ("auto", "torch")
_choice = os.environ.get("NEXT_DEPLOY_KERNELS", "auto")
_logged: set[str] = set()
_lowering = None  # while exporting to ONNX: an object whose methods emit the target's nodes for each kernel


@contextmanager
def lowered_to(lowering):
    """Within this block, exported graphs call `lowering.gated_delta_rule` / `lowering.causal_conv1d` (same
    contracts) instead of the custom ops: how an exporter puts its own backend's nodes in the graph."""
    global _lowering
    previous, _lowering = _lowering, lowering
    try:
        yield
    finally:
        _lowering = previous


def use_kernels(choice: str) -> None:
    """'auto': fast CUDA kernels where available, else the reference; 'torch': always the reference."""
    global _choice
    if choice not in _CHOICES:
        raise ValueError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    _choice = choice


def _announce(path: str) -> None:
    # Inside torch.compile a log call would split the graph; the compiling caller says what it traced instead.
    if torch.compiler.is_compiling():
        return
    if path not in _logged:
        _logged.add(path)
        log.info("kernel path: %s", path)


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """The gated delta rule; while exporting, the `nextdeploy::gated_delta_rule` custom op."""
    if torch.compiler.is_exporting():
        if initial_state is None:
            B, _, Hv, V = v.shape
            initial_state = torch.zeros(B, Hv, k.shape[-1], V, dtype=torch.float32, device=v.device)
        return (_lowering or ops).gated_delta_rule(q, k, v, g, beta, initial_state)
    return run_gated_delta_rule(q, k, v, g, beta, initial_state)


def causal_conv1d(x, weight, state=None):
    """Causal conv1d + SiLU; while exporting, the `nextdeploy::causal_conv1d` custom op."""
    if torch.compiler.is_exporting():
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[2], weight.shape[-1] - 1)
        return (_lowering or ops).causal_conv1d(x, weight, state)
    return run_causal_conv1d(x, weight, state)


def run_gated_delta_rule(q, k, v, g, beta, initial_state=None):
    """q, k: [B,T,Hk,K] (raw; l2-normalised inside); v: [B,T,Hv,V]; g: [B,T,Hv] log-decay; beta: [B,T,Hv].

    Returns (o [B,T,Hv,V], final state [B,Hv,K,V] float32).
    """
    if _choice == "auto" and q.is_cuda and fast.HAVE_FLA:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
        if not needs_grad or fast.FLA_BACKWARD_WORKS:
            _announce("gated delta rule: fla (CUDA)")
            return fast.gated_delta_rule(q, k, v, g, beta, initial_state)
        _announce("gated delta rule: torch reference for training (fla's backward is disabled on Hopper with "
                  "this Triton; install tilelang or Triton >= 3.7.1 to train with fla)")
    _announce("gated delta rule: torch reference (recurrent for short inputs, chunked for long)")
    if q.shape[1] <= 16:
        return reference.gated_delta_rule_recurrent(q, k, v, g, beta, initial_state)
    return reference.gated_delta_rule_chunked(q, k, v, g, beta, initial_state)


def run_causal_conv1d(x, weight, state=None):
    """x: [B,T,C]; weight: [C,W]; state: [B,C,W-1] or None. Returns (silu(conv) [B,T,C], new state)."""
    if _choice == "auto" and x.is_cuda and fast.HAVE_CAUSAL_CONV1D and x.dtype != torch.float64:
        _announce("causal conv1d: causal-conv1d (CUDA)")
        return fast.causal_conv1d(x, weight, state)
    _announce("causal conv1d: torch reference")
    return reference.causal_conv1d(x, weight, state)
