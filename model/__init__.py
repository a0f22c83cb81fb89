"""Qwen3-Next hybrid model (Gated DeltaNet + gated attention, optional MoE), matching transformers' layout.

Attributes load lazily so that torch-free parts (model.tokenizer, model.sampling, model.errors) can be used by
the ONNX Runtime backend without importing torch.
"""

import importlib

_EXPORTS = {
    "PRESETS": "config", "Qwen3NextConfig": "config", "preset": "config",
    "Qwen3NextForCausalLM": "model", "InferenceState": "state",
    "NextDeployError": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "CapacityError": "errors", "DataError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
