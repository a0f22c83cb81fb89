"""The one dispatch point for the model's two recurrent kernels.

`gated_delta_rule` and `causal_conv1d` keep one contract (see reference.py) whichever implementation runs:
the plain PyTorch reference on CPU (or when forced), fla / causal-conv1d on CUDA when they are importable.
Select with `use_kernels("auto" | "torch")` or the environment variable NEXT_DEPLOY_KERNELS.
"""

from __future__ import annotations

import logging
import os

import torch

from . import fast, reference

log = logging.getLogger("next_deploy.kernels")

_CHOICES = ("auto", "torch")
_choice = os.environ.get("NEXT_DEPLOY_KERNELS", "auto")
_logged: set[str] = set()


def use_kernels(choice: str) -> None:
    """'auto': fast CUDA kernels where available, else the reference; 'torch': always the reference."""
    global _choice
    if choice not in _CHOICES:
        raise ValueError(f"kernels must be one of {_CHOICES}, got {choice!r}")
    _choice = choice


def _announce(path: str) -> None:
    if path not in _logged:
        _logged.add(path)
        log.info("kernel path: %s", path)


def gated_delta_rule(q, k, v, g, beta, initial_state=None):
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


def causal_conv1d(x, weight, state=None):
    """x: [B,T,C]; weight: [C,W]; state: [B,C,W-1] or None. Returns (silu(conv) [B,T,C], new state)."""
    if _choice == "auto" and x.is_cuda and fast.HAVE_CAUSAL_CONV1D and x.dtype != torch.float64:
        _announce("causal conv1d: causal-conv1d (CUDA)")
        return fast.causal_conv1d(x, weight, state)
    _announce("causal conv1d: torch reference")
    return reference.causal_conv1d(x, weight, state)
