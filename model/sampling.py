"""Next-token selection from logits: greedy, temperature, top-k, top-p, repetition penalty. NumPy only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingConfig:
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0   # >1 discourages tokens already in the row (CTRL-style)
    seed: int | None = None

    def __post_init__(self):
        # Written so that NaN fails every check; inf is no temperature or penalty either.
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"top_k must be a whole number >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[list[int]] | None = None) -> np.ndarray:
        """logits: [B, V] -> token ids [B]. `history` holds each row's tokens so far, for the repetition penalty."""
        logits = self.penalized(logits, history)
        if self.config.temperature == 0:
            return logits.argmax(-1)
        return np.array([self.rng.choice(len(p), p=p) for p in self.probabilities(logits)])

    def penalized(self, logits: np.ndarray, history: list[list[int]] | None) -> np.ndarray:
        """float64 logits with tokens seen in each row made less likely (CTRL's repetition penalty)."""
        c = self.config
        logits = np.array(logits, dtype=np.float64)
        if c.repetition_penalty != 1.0 and history is not None:
            for row, seen in zip(logits, history):
                seen = np.unique(np.asarray(seen, dtype=np.int64))
                if seen.size:
                    vals = row[seen]
                    row[seen] = np.where(vals > 0, vals / c.repetition_penalty, vals * c.repetition_penalty)
        return logits

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """What sampling draws from: softmax(logits / temperature), cut to the top k, then to the top-p nucleus."""
        c = self.config
        logits = logits / c.temperature
        if c.top_k and c.top_k < logits.shape[-1]:
            kth = np.partition(logits, -c.top_k, axis=-1)[:, -c.top_k, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if c.top_p < 1.0:
            order = np.argsort(-probs, axis=-1, kind="stable")   # ties: the lower id first
            sorted_p = np.take_along_axis(probs, order, -1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= c.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        return probs
