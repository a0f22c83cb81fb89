"""torch.export backend: the prefill.pt2 / decode.pt2 programs, custom kernel ops resolved through model.kernels."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .manifest import ArtifactError, Manifest, TensorSpec


def load_program(path: Path, manifest: Manifest):
    """An ExportedProgram whose signature is the manifest's, or an ArtifactError naming the file."""
    import torch

    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)   # it logs a traceback before raising on a damaged file
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # a damaged zip surfaces as RuntimeError, BadZipFile, KeyError, ...
        raise ArtifactError(f"{path} cannot be loaded ({type(e).__name__}); the file is damaged or incomplete, "
                            "rebuild the artifact with `python -m export`") from e
    finally:
        log.setLevel(level)
    signature = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    output = next(n for n in program.graph.nodes if n.op == "output").args[0]
    user_outputs = set(signature.user_outputs)

    def spec(value):
        return TensorSpec("", [d if isinstance(d, int) else None for d in value.shape],
                          str(value.dtype).removeprefix("torch."))
    inputs = [nodes[name].meta["val"] for name in signature.user_inputs]
    manifest.check_graph(str(path), [spec(v) for v in inputs],
                         [spec(n.meta["val"]) for n in output if n.name in user_outputs], named=False)
    batch = inputs[0].shape[0]
    largest = batch if isinstance(batch, int) else program.range_constraints[batch.node.expr].upper
    if largest < manifest.max_batch:
        raise ArtifactError(f"{path} takes batches of at most {largest}, but manifest.json says {manifest.max_batch}; "
                            "the artifact was modified, rebuild it with `python -m export`")
    return program


def weight_stand_in(t):
    """What a program file holds in place of a weight that another file of the artifact stores: the weight's shape
    and dtype over one element (stride 0), so that the file carries the graph without the bytes. share_weights
    replaces every stand-in with the stored weight when the programs are loaded together. A weight of one element
    is its own stand-in: nothing to save, and a stand-in must be told apart from a weight (is_stand_in)."""
    import torch
    if t.numel() <= 1:
        return t
    s = torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)
    return torch.nn.Parameter(s, requires_grad=False) if isinstance(t, torch.nn.Parameter) else s


def is_stand_in(t) -> bool:
    return t.numel() > 1 and not any(t.stride())


def share_weights(programs: dict) -> dict:
    """Make every program use one set of weight tensors, in place, and return `programs` ({role: program}).
    Prefill and decode are exported from one model: one file stores the weights and the other stand-ins
    (weight_stand_in); in artifacts from before that, each file holds a copy, which would otherwise sit twice in
    device memory. Tensors are shared by name where shape and dtype agree; a stand-in that no file's weight
    replaces means the files come from different exports."""
    import torch
    tables = [(role, table) for role, program in programs.items()
              for table in (program.state_dict, program.constants)]
    stored = {}
    for _, table in tables:
        for name, t in table.items():
            if isinstance(t, torch.Tensor) and not is_stand_in(t):
                stored.setdefault(name, t)
    for role, table in tables:
        for name, t in table.items():
            other = stored.get(name)
            if other is not None and other.shape == t.shape and other.dtype == t.dtype:
                table[name] = other
            elif isinstance(t, torch.Tensor) and is_stand_in(t):
                raise ArtifactError(f"the {role} program's weight {name} is stored in none of the artifact's "
                                    "program files (files from different exports?); rebuild it with "
                                    "`python -m export`")
    return programs


def zeros_state(specs, batch: int, device):
    """A zero state of `batch` rows for the manifest's state specs."""
    import torch
    return [torch.zeros([batch, *s.shape[1:]], dtype=getattr(torch, s.dtype), device=device) for s in specs]


class TorchExportBackend:
    def __init__(self, directory: Path, manifest: Manifest, device: str):
        import model.kernels.ops  # noqa: F401  (registers nextdeploy:: ops the programs call)
        import torch
        from model.device import torch_device

        target = manifest.targets.get("torch")
        if target is None:
            raise ArtifactError(f"{directory} has no torch target (built: {', '.join(manifest.targets)}); "
                                "re-export with --target torch")
        self.torch = torch
        self.device = torch_device(device)
        self.specs = manifest.state
        programs = share_weights({role: load_program(directory / name, manifest)
                                  for role, name in target["files"].items()})
        self.programs = {role: program.module() for role, program in programs.items()}

    def new_state(self, batch: int):
        return zeros_state(self.specs, batch, self.device)

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
