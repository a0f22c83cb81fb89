"""Export checks itself: the artifact against the eager model on a fixed token sequence.

Prefill of the first tokens, then teacher-forced decode steps, for a batch of two different sequences; the
reference is one full float32 forward of the eager model over the same tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from model import Qwen3NextForCausalLM

from .errors import ExportError

# Relative logit error (norm of difference over norm of reference) that fails an export; in 16-bit dtypes the
# limit is raised to twice what the eager model itself reaches in that dtype, where that is more (dtype_error).
TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 5e-2}


def fixed_tokens(vocab_size: int, length: int) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, vocab_size, size=(2, length), dtype=np.int64)


def reference_logits(model: Qwen3NextForCausalLM, tokens: np.ndarray) -> np.ndarray:
    """The logits of a float32 CPU model with `model`'s weights: `model` itself when it is one, else a copy."""
    reference = model
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.state_dict().values()):
        reference = Qwen3NextForCausalLM(model.config).eval()
        reference.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    with torch.no_grad():
        return reference(torch.from_numpy(tokens)).numpy()


def dtype_error(model: Qwen3NextForCausalLM, tokens: np.ndarray, reference: np.ndarray) -> float | None:
    """The eager model's own relative logit error in its dtype against `reference` (reference_logits of the same
    tokens): what the dtype alone costs with these weights; None for a float32 model. Random weights make it large
    (a random-weight `small` in bf16: 0.13), trained ones small (`tiny` trained: under 1e-2)."""
    if next(model.parameters()).dtype == torch.float32:
        return None
    with torch.no_grad():
        got = model(torch.from_numpy(tokens).to(next(model.parameters()).device)).float().cpu().numpy()
    return compare(got, reference)["rel_error"]


def compare(got: np.ndarray, expected: np.ndarray) -> dict:
    diff = got.astype(np.float64) - expected
    return {"max_abs_error": float(np.abs(diff).max()),
            "rel_error": float(np.linalg.norm(diff) / np.linalg.norm(expected)),
            "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean())}


def run_engine_teacher_forced(engine, tokens: np.ndarray, prefill_len: int) -> np.ndarray:
    """Logits predicting tokens[prefill_len:] ... : prefill, then decode the true next token each step."""
    state = engine.new_state(tokens.shape[0])
    out = [engine.prefill(tokens[:, :prefill_len], state)]
    for t in range(prefill_len, tokens.shape[1] - 1):
        out.append(engine.decode(tokens[:, t], state))
    return np.stack(out, axis=1)


def parity(engine, tokens: np.ndarray, expected: np.ndarray, prefill_len: int) -> dict:
    """The engine's figures against `expected` (the eager logits predicting tokens[prefill_len:])."""
    got = run_engine_teacher_forced(engine, tokens, prefill_len)
    figures = compare(got, expected)
    figures.update(prefill_tokens=prefill_len, decode_steps=got.shape[1] - 1, batch=tokens.shape[0])
    return figures


def check(figures: dict, dtype: str, target: str, eager_error: float | None = None) -> None:
    """Fail on an error above TOLERANCE[dtype], or above twice `eager_error` (dtype_error) where that is more."""
    limit = max(TOLERANCE[dtype], 2 * (eager_error or 0.0))
    if not figures["rel_error"] <= limit:
        eager = f"; the eager model in {dtype}: {eager_error:.2e}" if eager_error is not None else ""
        raise ExportError(f"{target} artifact disagrees with the eager model: relative logit error "
                          f"{figures['rel_error']:.2e} exceeds {limit:.1e} for {dtype} (top-1 agreement "
                          f"{figures['top1_agreement']:.3f}{eager}); the export is wrong, nothing was written")
