"""model.sampling.Sampler's next-token selection, run where the logits are (torch, any device).

Same rules, in float32: repetition penalty on the tokens seen in each row, greedy argmax at temperature 0, else
softmax(logits / temperature) cut to the top k and the top-p nucleus. The draw uses a seeded torch.Generator on
the device (the exponential race: argmax of p / E with E ~ Exp(1) picks token i with probability p_i), so nothing
but the chosen ids has to leave the device, and no step synchronises with the host. Seeded runs repeat; the draws
differ from the NumPy sampler's, the distribution does not.
"""

from __future__ import annotations

import torch

from model.sampling import SamplingConfig


class DeviceSampler:
    def __init__(self, config: SamplingConfig, device: str | torch.device):
        self.config = config
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)
        self.seen: torch.Tensor | None = None   # [B, vocab] bool, for the repetition penalty
        self.counted: list[int] = []             # how much of each row's history `seen` holds

    def __call__(self, logits: torch.Tensor, history: list[list[int]] | None = None) -> torch.Tensor:
        """logits [B, V] on the device -> token ids [B] on the device. `history`: each row's tokens so far (only
        what was appended since the last call is sent to the device)."""
        if self.config.repetition_penalty != 1.0 and history is not None:
            self.observe(history, logits.shape[-1])
        logits = self.penalized(logits)
        if self.config.temperature == 0:
            return logits.argmax(-1)
        probs = self.probabilities(logits)
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        return (probs / race).argmax(-1)

    def observe(self, history: list[list[int]], vocab_size: int) -> None:
        if self.seen is None or self.seen.shape[0] != len(history):
            self.seen = torch.zeros(len(history), vocab_size, dtype=torch.bool, device=self.device)
            self.counted = [0] * len(history)
        rows = [b for b, seen in enumerate(history) for _ in seen[self.counted[b]:]]
        tokens = [t for b, seen in enumerate(history) for t in seen[self.counted[b]:]]
        if tokens:
            index = torch.tensor([rows, tokens], dtype=torch.long).to(self.device, non_blocking=True)
            self.seen[index[0], index[1]] = True
        self.counted = [len(seen) for seen in history]

    def penalized(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        p = self.config.repetition_penalty
        if p == 1.0 or self.seen is None:
            return logits
        return torch.where(self.seen, torch.where(logits > 0, logits / p, logits * p), logits)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.config
        logits = logits / c.temperature
        if c.top_k and c.top_k < logits.shape[-1]:
            kth = logits.topk(c.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if c.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)   # ties: the lower id first
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            drop_sorted = sorted_p.cumsum(-1) - sorted_p >= c.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs
