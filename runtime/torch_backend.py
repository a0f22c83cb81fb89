"""torch.export backend: the prefill.pt2 / decode.pt2 programs, custom kernel ops resolved through model.kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest


class TorchExportBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str):
        import torch
        import model.kernels.ops  # noqa: F401  (registers nextdeploy:: ops the programs call)

        target = manifest.targets.get("torch")
        if target is None:
            raise ArtifactError(f"{directory} has no torch target (built: {', '.join(manifest.targets)}); "
                                "re-export with --target torch")
        if device == "cuda" and not torch.cuda.is_available():
            raise ArtifactError("device='cuda' needs a CUDA GPU and a CUDA build of torch")
        self.torch = torch
        self.device = torch.device(device)
        self.specs = manifest.state
        self.programs = {role: torch.export.load(str(directory / name)).module()
                         for role, name in target["files"].items()}

    def new_state(self, batch: int):
        torch = self.torch
        return [torch.zeros([batch, *s.shape[1:]], dtype=getattr(torch, s.dtype), device=self.device)
                for s in self.specs]

    def clone_state(self, tensors):
        return [t.clone() for t in tensors]

    def step(self, ids: np.ndarray, tensors, rows: np.ndarray, batch: int) -> np.ndarray:
        torch = self.torch
        whole = len(rows) == batch
        index = torch.from_numpy(rows).to(self.device)
        program = self.programs["decode" if ids.shape[1] == 1 else "prefill"]
        with torch.no_grad():
            logits, *new = program(torch.from_numpy(ids).to(self.device),
                                   *(tensors if whole else [t[index] for t in tensors]))
        for t, n in zip(tensors, new):
            if whole:
                t.copy_(n)
            else:
                t[index] = n
        return logits.float().cpu().numpy()
