"""manifest.json: what an artifact directory holds and how to run it. Written by `python -m export`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import NextDeployError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(NextDeployError):
    """A missing, incomplete or incompatible artifact directory."""


def checkpoint_hash(directory: str | os.PathLike) -> str:
    """sha256 over config.json and the weight files, in name order."""
    directory = Path(directory)
    files = [directory / "config.json"] + sorted(directory.glob("model*.safetensors")) + \
        sorted(directory.glob("model.safetensors.index.json"))
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def is_artifact(directory: Path) -> bool:
    """Whether `directory` holds an artifact written by `python -m export` (which may replace it)."""
    try:
        d = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("format_version"), int) and "targets" in d


@dataclass
class TensorSpec:
    name: str
    shape: list  # ints, or strings naming dynamic dims ("batch", "sequence")
    dtype: str


@dataclass
class Manifest:
    model_config: dict
    dtype: str
    device: str
    max_batch: int
    max_seq_len: int
    targets: dict            # target name -> {file roles: file names, other facts}
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[TensorSpec]
    source: dict             # {"path": checkpoint dir, "sha256": checkpoint_hash}
    tokenizer: str | None = "tokenizer.json"
    parity: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        from dataclasses import asdict
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        directory = Path(directory)
        if not directory.is_dir():
            raise ArtifactError(f"artifact directory {directory} does not exist; build one with "
                                f"`python -m export CHECKPOINT --out {directory}`")
        path = directory / MANIFEST
        if not path.is_file():
            raise ArtifactError(f"{path} not found: {directory} is not a complete artifact; rebuild it with "
                                "`python -m export`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path} is corrupt ({e}); rebuild the artifact with `python -m export`") from e
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(f"{path} has format version {version}, newer than this runtime reads "
                                f"({FORMAT_VERSION}); upgrade next-deploy or re-export with this version")
        try:
            for key in ("inputs", "outputs", "state"):
                d[key] = [TensorSpec(**s) for s in d[key]]
            manifest = cls(**d)
        except (TypeError, KeyError) as e:
            raise ArtifactError(f"{path} is missing fields ({e}); rebuild the artifact with `python -m export`") from e
        for target, files in manifest.targets.items():
            for role, name in files.get("files", {}).items():
                if not (directory / name).is_file():
                    raise ArtifactError(f"{directory / name} ({target} {role}) is missing: the artifact is "
                                        "incomplete; rebuild it with `python -m export`")
        return manifest
