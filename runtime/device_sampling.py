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
    """`graphs` (CUDA): the selection after the first call on a logits buffer replays as a CUDA graph over that
    buffer: one launch instead of about twenty (top-p sorts the vocabulary), which the compiled engine's generate()
    pays at every token. The random draw stays outside the graph, so the draws are those of the plain calls."""

    def __init__(self, config: SamplingConfig, device: str | torch.device, graphs: bool = False):
        self.config = config
        self.device = torch.device(device)
        self.graphs = graphs and self.device.type == "cuda"
        self.generator = torch.Generator(device=self.device)
        if config.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(config.seed)
        self.seen: torch.Tensor | None = None   # [B, vocab] bool, for the repetition penalty
        self.counted: list[int] = []             # how much of each row's history `seen` holds
        # logits buffer (and `seen`) -> (graph, its race buffer, its ids), or () when seen once
        self.captured: dict[tuple, tuple] = {}

    def __call__(self, logits: torch.Tensor, history: list[list[int]] | None = None) -> torch.Tensor:
        """logits [B, V] on the device -> token ids [B] on the device (with `graphs`, a buffer the next call
        overwrites). `history`: each row's tokens so far (only what was appended since the last call is sent to the
        device)."""
        if self.config.repetition_penalty != 1.0 and history is not None:
            self.observe(history, logits.shape[-1])
        captured = self.graph_for(logits) if self.graphs else None
        if captured is None:
            return self.select(logits, self.draw(logits))
        graph, race, ids = captured
        if race is not None:
            race.exponential_(generator=self.generator)
        graph.replay()
        return ids

    def draw(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The race's Exp(1) variates for these logits (None: greedy, nothing drawn)."""
        if self.config.temperature == 0:
            return None
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(
            generator=self.generator)

    def select(self, logits: torch.Tensor, race: torch.Tensor | None) -> torch.Tensor:
        """The ids, given the race's variates (None: greedy)."""
        logits = self.penalized(logits)
        if race is None:
            return logits.argmax(-1)
        return (self.probabilities(logits) / race).argmax(-1)

    def graph_for(self, logits: torch.Tensor) -> tuple | None:
        """(graph, race buffer, ids) of select() over this logits buffer, captured at the buffer's second use: a
        decode graph's output comes back every step, while a prefill's logits (the first token) are a fresh tensor
        each time, not worth a capture. None before that."""
        key = (logits.data_ptr(), tuple(logits.shape), logits.stride(), self.seen is not None and self.seen.data_ptr())
        entry = self.captured.get(key)
        if entry is None:
            self.captured[key] = ()
            return None
        if entry == ():
            entry = self.captured[key] = self.capture(logits)
        return entry

    def capture(self, logits: torch.Tensor) -> tuple:
        """A CUDA graph of select() over `logits` and a race buffer of its own, after one run on a side stream (the
        sort's workspace and lazily loaded kernels are set up outside the capture)."""
        race = None if self.config.temperature == 0 else \
            torch.ones(logits.shape, dtype=torch.float32, device=logits.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.select(logits, race)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ids = self.select(logits, race)
        return graph, race, ids

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


class TokenReader:
    """A sampled token's copy to the host, queued where it is in the device's work: reading it later waits for the
    copy alone, not for what was queued after it (on CUDA a pinned host buffer and an event; elsewhere a copy)."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.host = torch.empty(1, dtype=torch.int64, pin_memory=self.cuda)
        self.copied = torch.cuda.Event() if self.cuda else None

    def queue(self, token: torch.Tensor) -> None:
        """token: [1] on the device."""
        self.host.copy_(token[:1], non_blocking=self.cuda)
        if self.cuda:
            self.copied.record()

    def read(self) -> int:
        if self.cuda:
            self.copied.synchronize()
        return int(self.host[0])
