"""HF-format checkpoint directories: config.json + model.safetensors (or a sharded index) [+ tokenizer.json].

On disk routed experts are one module per expert (`mlp.experts.{e}.gate_proj.weight`, ...), as transformers
writes them; in memory they are stacked (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Qwen3NextConfig
from .errors import CheckpointError
from .io import atomic_path

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def stack_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert on-disk keys -> stacked gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    out, groups = {}, {}
    for key, t in tensors.items():
        m = _EXPERT.match(key)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[key] = t
    for prefix, parts in groups.items():
        missing = [f"{prefix}.{e}.{p}.weight" for e in range(num_experts)
                   for p in ("gate_proj", "up_proj", "down_proj") if (e, p) not in parts]
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} expert weights (first: {missing[0]}); "
                                  "it is incomplete or its config's num_experts is wrong")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(num_experts)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(num_experts)])
    return out


def unstack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if key.endswith(".experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}.{e}.up_proj.weight"] = up[e]
        elif key.endswith(".experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    return out


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{directory / INDEX} is corrupt ({e}); re-save or re-download the checkpoint") from e
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"no {WEIGHTS} or {INDEX} in {directory}; save the model with save_pretrained "
                              "(or transformers' save_pretrained with safe_serialization) first")
    tensors = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {INDEX} but missing; the checkpoint download is incomplete")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); the checkpoint is corrupt, "
                                  "re-save or re-download it") from e
    return tensors


def load_state_dict(directory: str | os.PathLike, config: Qwen3NextConfig) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    tensors = read_safetensors(directory)
    # Multi-token-prediction heads ship with some released checkpoints; inference does not use them.
    tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    return stack_experts(tensors, config.num_experts)


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [f"{k}: config implies {tuple(expected[k])}, weights have {tuple(tensors[k].shape)}"
                 for k in expected if k in tensors and tensors[k].shape != expected[k]]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"config.json and the weights in {where} disagree ({shown}); use the config.json "
                              "that was saved with these weights")


def checkpoint_directory(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist; pass the directory that "
                              "`python -m train --out` wrote, or an HF-format Qwen3-Next directory")
    return directory


def load_model(directory: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None):
    from .model import Qwen3NextForCausalLM

    directory = checkpoint_directory(directory)
    config = Qwen3NextConfig.load(directory)
    tensors = load_state_dict(directory, config)
    if config.tie_word_embeddings and "model.embed_tokens.weight" in tensors:
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config)
    check_state_dict(model, tensors, directory)
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def save_model(model, directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors, each atomically, in a layout transformers loads."""
    save_state_dict(model.state_dict(), model.config, directory)


def save_state_dict(state_dict: dict[str, torch.Tensor], config: Qwen3NextConfig,
                    directory: str | os.PathLike) -> None:
    """`save_model` for a state dict held apart from its model (e.g. gathered from a sharded one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = {k: v.contiguous() for k, v in unstack_experts(tensors).items()}
    with atomic_path(directory / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.save(directory)
    # A sharded index left from an earlier save would shadow the file just written.
    (directory / INDEX).unlink(missing_ok=True)
