"""transformers' Qwen3NextForCausalLM on our checkpoint, behind the runtime's backend interface: the external
anchor every other backend is compared with. Its state is transformers' own cache (DynamicCache), so its decode
path is the one transformers users get, with fla / causal-conv1d when they are installed."""

from __future__ import annotations

import copy

import numpy as np

from runtime import InputError


class TransformersBackend:
    def __init__(self, checkpoint, dtype: str, device: str):
        import torch
        import transformers

        self.torch = torch
        self.device = torch.device(device)
        self.model = transformers.Qwen3NextForCausalLM.from_pretrained(
            str(checkpoint), dtype=getattr(torch, dtype)).to(self.device).eval()
        self.linear_layers = [i for i, kind in enumerate(self.model.config.layer_types) if kind == "linear_attention"]

    def new_state(self, batch: int):
        # A one-element list: the engine holds the list, the cache object inside is what each step mutates.
        return [new_cache(self.model.config)]

    def clone_state(self, tensors):
        return [copy.deepcopy(tensors[0])]

    def step(self, ids: np.ndarray, tensors, rows: np.ndarray, batch: int) -> np.ndarray:
        torch = self.torch
        if len(rows) != batch:
            raise InputError("the hf backend prefills whole batches only; give every row the same length")
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids).to(self.device), past_key_values=tensors[0],
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float().cpu().numpy()

    def recurrent_states(self, tensors) -> dict[int, np.ndarray]:
        """Each Gated DeltaNet layer's recurrent state [B, Hv, K, V] as float64 host arrays."""
        cache = tensors[0]
        if hasattr(cache, "get_recurrent_state"):          # transformers >= 5.2x: DynamicCache
            get = cache.get_recurrent_state
        elif hasattr(cache, "recurrent_states"):           # early 5.x: Qwen3NextDynamicCache
            get = cache.recurrent_states.__getitem__
        else:                                              # 5.1x: DynamicCache's linear-attention layers
            def get(i):
                return cache.layers[i].recurrent_states[0]
        return {i: get(i).double().cpu().numpy() for i in self.linear_layers}


def new_cache(config):
    """The cache transformers' Qwen3-Next takes: its own Qwen3NextDynamicCache in earlier 5.x releases, the generic
    DynamicCache (which learned linear-attention layers) in later ones."""
    from transformers.models.qwen3_next import modeling_qwen3_next
    own = getattr(modeling_qwen3_next, "Qwen3NextDynamicCache", None)
    if own is not None:
        return own(config)
    from transformers import DynamicCache
    return DynamicCache(config=config)
