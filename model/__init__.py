"""Qwen3-Next hybrid model (Gated DeltaNet + gated attention, optional MoE), matching transformers' layout."""

from .config import PRESETS, Qwen3NextConfig, preset
from .errors import CapacityError, CheckpointError, ConfigError, DataError, NextDeployError
from .model import Qwen3NextForCausalLM
from .state import InferenceState

__all__ = [
    "PRESETS", "Qwen3NextConfig", "preset", "Qwen3NextForCausalLM", "InferenceState",
    "NextDeployError", "ConfigError", "CheckpointError", "CapacityError", "DataError",
]
