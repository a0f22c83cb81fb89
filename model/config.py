"""Model configuration: the fields of transformers' `Qwen3NextConfig`, read from and written to config.json."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .fields import type_problems

# Sizes and counts that must be at least 1 (those of the experts only when the model has experts).
_AT_LEAST_ONE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "full_attention_interval")
_AT_LEAST_ONE_MOE = ("moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step")


@dataclass
class Qwen3NextConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    attention_bias: bool = False
    # Gated DeltaNet
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 64
    linear_value_head_dim: int = 64
    linear_num_key_heads: int = 4
    linear_num_value_heads: int = 4
    # Mixture of experts (num_experts == 0 means every layer is a dense SwiGLU MLP)
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 256
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    layer_types: list[str] | None = None
    full_attention_interval: int = 4
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        problems = type_problems(type(self), dataclasses.asdict(self))
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        self._check_ranges()
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if (i + 1) % self.full_attention_interval == 0 else "linear_attention"
                for i in range(self.num_hidden_layers)
            ]
        self.validate()

    def _check_ranges(self) -> None:
        """Sizes, counts and factors that would otherwise divide by zero or build empty layers."""
        problems = [f"{name} must be at least 1, got {getattr(self, name)}" for name in _AT_LEAST_ONE
                    if getattr(self, name) < 1]
        if self.num_experts:
            problems += [f"{name} must be at least 1 with num_experts > 0, got {getattr(self, name)}"
                         for name in _AT_LEAST_ONE_MOE if getattr(self, name) < 1]
        if self.num_experts < 0:
            problems.append(f"num_experts must be 0 (dense) or more, got {self.num_experts}")
        if self.linear_conv_kernel_dim < 2:
            problems.append(f"linear_conv_kernel_dim must be at least 2, got {self.linear_conv_kernel_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.partial_rotary_factor <= 1:
            problems.append(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def validate(self) -> None:
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                            f"{self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - {"linear_attention", "full_attention"})
        if unknown:
            problems.append(f"unknown layer_types {unknown}; use 'linear_attention' or 'full_attention'")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                            f"num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append(f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                            f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            problems.append(f"head_dim * partial_rotary_factor = {self.rotary_dim} must be even and at most head_dim")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                            f"1..num_experts ({self.num_experts})")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            problems.append(f"mlp_only_layers {outside} are not layer indices (0..{self.num_hidden_layers - 1})")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported; Qwen3-Next uses 'silu'")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                problems.append(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    # ---- config.json ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("full_attention_interval")  # layer_types says it explicitly
        rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta"),
                "partial_rotary_factor": d.pop("partial_rotary_factor")}
        # Written in transformers 5.x form; transformers reads it into Qwen3NextForCausalLM directly.
        return {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **d,
                "rope_parameters": rope}

    @classmethod
    def from_dict(cls, d: dict) -> "Qwen3NextConfig":
        """From config.json's contents. Keys this model does not use (transformers writes many) are ignored."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config is a JSON object of fields, got {type(d).__name__}")
        d = dict(d)
        model_type = d.pop("model_type", "qwen3_next")
        if model_type != "qwen3_next":
            raise ConfigError(f"config.json has model_type {model_type!r}; this project loads 'qwen3_next' models")
        # rope settings sit at top level in transformers 4.x and under rope_parameters in 5.x.
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters should be an object, got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope_type {rope_type!r} is not supported; only 'default' RoPE is implemented")
        d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        d.setdefault("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
        if d.get("mlp_only_layers") is None:
            d["mlp_only_layers"] = []
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"config.json does not describe a Qwen3-Next model: {e}") from e

    def save(self, directory: str | os.PathLike) -> None:
        from .io import atomic_write_text
        atomic_write_text(Path(directory) / "config.json", json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Qwen3NextConfig":
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: a checkpoint directory needs config.json "
                              "(train one with `python -m train` or point at an HF-format Qwen3-Next directory)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt, "
                              "re-save or re-download it") from e
        return cls.from_dict(d)

    def num_parameters(self) -> int:
        from .model import Qwen3NextForCausalLM
        import torch
        with torch.device("meta"):
            return sum(p.numel() for p in Qwen3NextForCausalLM(self).parameters())


PRESETS: dict[str, dict] = {
    # ~10M parameters: 6 Gated DeltaNet + 2 gated attention layers.
    "tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                 linear_num_key_heads=4, linear_num_value_heads=4, linear_key_head_dim=64,
                 linear_value_head_dim=64, partial_rotary_factor=0.25, max_position_embeddings=4096),
    # ~0.5B dense, Qwen3-Next proportions (value heads = 2x key heads).
    "small": dict(vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                  linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
                  linear_value_head_dim=128, partial_rotary_factor=0.25, max_position_embeddings=32768),
    # Routed experts plus a gated shared expert in every layer.
    "small-moe": dict(vocab_size=32768, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=256,
                      linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=128,
                      linear_value_head_dim=128, partial_rotary_factor=0.25, max_position_embeddings=32768,
                      num_experts=32, num_experts_per_tok=4, moe_intermediate_size=512,
                      shared_expert_intermediate_size=1024),
}


def preset(name: str, **overrides) -> Qwen3NextConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(Qwen3NextConfig)}
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(sorted(known))}"
            raise ConfigError(f"unknown model config field {key!r}; {hint}")
    return Qwen3NextConfig(**{**PRESETS[name], **overrides})
