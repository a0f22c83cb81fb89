"""Fixed-capacity inference state: allocated once, addressed by position, updated in place.

Per Gated DeltaNet layer a conv state [B, conv_dim, W-1] (model dtype) and a recurrent state [B, Hv, K, V]
(float32); per attention layer a key and a value cache [B, Hkv, max_seq_len, head_dim]; per row the number of
tokens seen so far. Because no buffer is ever reallocated, compiled engines can replay CUDA graphs over it.
"""

from __future__ import annotations

import torch

from .config import Qwen3NextConfig
from .errors import CapacityError


class InferenceState:
    def __init__(self, config: Qwen3NextConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", *, _buffers=None):
        if batch_size < 1 or max_seq_len < 1:
            raise CapacityError(f"batch_size ({batch_size}) and max_seq_len ({max_seq_len}) must be at least 1")
        self.config = config
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        if _buffers is not None:
            self.layers, self.lengths = _buffers
            return
        W = config.linear_conv_kernel_dim
        conv_dim = 2 * config.linear_num_key_heads * config.linear_key_head_dim + \
            config.linear_num_value_heads * config.linear_value_head_dim
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == "linear_attention":
                self.layers[i] = (
                    torch.zeros(batch_size, conv_dim, W - 1, dtype=dtype, device=device),
                    torch.zeros(batch_size, config.linear_num_value_heads, config.linear_key_head_dim,
                                config.linear_value_head_dim, dtype=torch.float32, device=device))
            else:
                shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
                self.layers[i] = (torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def device(self) -> torch.device:
        return self.lengths.device

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer in a fixed order (per layer: conv, recurrent or key, value), lengths last."""
        return [t for i in sorted(self.layers) for t in self.layers[i]] + [self.lengths]

    def names(self) -> list[str]:
        names = []
        for i in sorted(self.layers):
            kind = self.config.layer_types[i]
            names += [f"conv_state.{i}", f"recurrent_state.{i}"] if kind == "linear_attention" else \
                [f"key_cache.{i}", f"value_cache.{i}"]
        return names + ["lengths"]

    @classmethod
    def from_tensors(cls, config: Qwen3NextConfig, tensors: list[torch.Tensor]) -> "InferenceState":
        """Wrap existing buffers (in `tensors()` order) without copying."""
        it = iter(tensors[:-1])
        layers = {i: (next(it), next(it)) for i in range(config.num_hidden_layers)}
        lengths = tensors[-1]
        max_seq_len = next((layers[i][0].shape[2] for i in config.full_attention_layers), 2**31 - 1)
        return cls(config, lengths.shape[0], max_seq_len, _buffers=(layers, lengths))

    def rows(self, index: slice | int) -> "InferenceState":
        """A view of some rows: updates through it land in this state's buffers."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        layers = {i: (a[index], b[index]) for i, (a, b) in self.layers.items()}
        lengths = self.lengths[index]
        return InferenceState(self.config, lengths.shape[0], self.max_seq_len, _buffers=(layers, lengths))

    def clone(self) -> "InferenceState":
        """An independent copy: fork a conversation and continue both."""
        layers = {i: (a.clone(), b.clone()) for i, (a, b) in self.layers.items()}
        return InferenceState(self.config, self.batch_size, self.max_seq_len, _buffers=(layers, self.lengths.clone()))

    def copy_(self, other: "InferenceState") -> "InferenceState":
        """Restore `other`'s contents into this state's buffers (e.g. from a clone() snapshot)."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()

    def check_room(self, num_tokens: int) -> None:
        longest = int(self.lengths.max())
        if longest + num_tokens > self.max_seq_len:
            raise CapacityError(
                f"{num_tokens} more tokens would take a row to {longest + num_tokens} tokens, past this state's "
                f"capacity of {self.max_seq_len}; shorten the prompt or allocate a larger state (max_seq_len)")
