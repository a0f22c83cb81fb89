"""Eager PyTorch backend: the checkpoint the artifact was exported from, behind the same engine API."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest, checkpoint_hash


class EagerBackend:
    def __init__(self, manifest: Manifest, device: str, checkpoint: str | None):
        import torch
        from model import Qwen3NextForCausalLM
        from model.device import torch_device

        path = Path(checkpoint or manifest.source["path"])
        if not path.is_dir():
            raise ArtifactError(f"the eager backend loads the source checkpoint, and {path} does not exist; pass "
                                "checkpoint=DIR (the directory the artifact was exported from)")
        if checkpoint_hash(path) != manifest.source["sha256"]:
            raise ArtifactError(f"{path} is not the checkpoint this artifact was exported from (its hash differs); "
                                "pass the original checkpoint or re-export from this one")
        device = torch_device(device)
        dtype = getattr(torch, manifest.dtype)
        self.torch = torch
        self.model = Qwen3NextForCausalLM.from_pretrained(path, dtype=dtype, device=device)
        self.max_seq_len = manifest.max_seq_len

    def new_state(self, batch: int):
        return self.model.new_state(batch, self.max_seq_len)

    def clone_state(self, state):
        return state.clone()

    def step(self, ids: np.ndarray, state, rows: np.ndarray, batch: int) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(ids).to(self.model.device)
        target = state if len(rows) == batch else state.rows(int(rows[0]))
        with torch.inference_mode():
            return self.model(x, target, logits_to_keep=1)[:, -1].float().cpu().numpy()
