"""Qwen3-Next hybrid decoder: Gated DeltaNet layers with gated full attention every few layers."""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import Qwen3NextConfig
from .errors import CapacityError
from .gated_deltanet import GatedDeltaNet
from .layers import MLP, Attention, Experts, RMSNorm, RotaryEmbedding, Router, SparseMoeBlock
from .state import InferenceState


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen3NextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = Attention(config)
        self.mlp = SparseMoeBlock(config) if config.is_moe_layer(layer_idx) else \
            MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, positions=None, layer_state=None, attend_len=None):
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, *(layer_state or (None, None)))
        else:
            h = self.self_attn(h, cos, sin, positions, *(layer_state or (None, None)), attend_len=attend_len)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextModel(nn.Module):
    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids, state: InferenceState | None = None, attend_len: int | None = None):
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        steps = torch.arange(T, device=input_ids.device)
        positions = steps.expand(B, T) if state is None else state.lengths[:, None] + steps
        cos, sin = self.rotary_emb(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            layer_state = None if state is None else state.layers[i]
            x = layer(x, cos, sin, positions, layer_state, attend_len)
        if state is not None:
            state.lengths.add_(T)
        return self.norm(x)


class Qwen3NextForCausalLM(nn.Module):
    """`model(input_ids)` -> logits [B, T, vocab]; `model(input_ids, state)` continues from and updates `state`."""

    def __init__(self, config: Qwen3NextConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, Experts):
            nn.init.normal_(module.gate_up_proj, std=std)
            nn.init.normal_(module.down_proj, std=std)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, std=std)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_state(self, batch_size: int = 1, max_seq_len: int | None = None) -> InferenceState:
        """Allocate an empty state on the model's device, in its dtype (recurrent states in float32)."""
        return InferenceState(self.config, batch_size, max_seq_len or self.config.max_position_embeddings,
                              dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, state: InferenceState | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] (or the last `logits_to_keep` positions)."""
        attend_len = None
        if state is not None:
            if input_ids.shape[0] != state.batch_size:
                raise CapacityError(f"input has batch {input_ids.shape[0]} but the state holds "
                                    f"{state.batch_size} rows; allocate the state with batch_size={input_ids.shape[0]}")
            state.check_room(input_ids.shape[1])
            attend_len = int(state.lengths.max()) + input_ids.shape[1]
        elif input_ids.shape[1] > self.config.max_position_embeddings:
            raise CapacityError(f"input of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                                f"({self.config.max_position_embeddings}); shorten it")
        hidden = self.model(input_ids, state, attend_len)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden)

    # ---- HF-format checkpoints ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "Qwen3NextForCausalLM":
        from .checkpoint import load_model
        return load_model(directory, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from .checkpoint import save_model
        save_model(self, directory)
