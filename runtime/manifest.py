"""manifest.json: what an artifact directory holds and how to run it. Written by `python -m export`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import ConfigError, NextDeployError
from model.fields import type_problems

# A reader refuses a newer major version. Minor versions only add fields, which older readers ignore.
# 1.1: format_minor itself; the ONNX opset is the one model.onnx holds.
# 1.2: the compiled target's "autotune" (absent: false).
# 1.3: the compiled target's "pdl" (absent: false).
# 1.4: the compiled target's "fused_linear_rows", as its programs hold it (absent: programs without the fused
#      linear kernel).
FORMAT_VERSION = 1
FORMAT_MINOR = 4
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")


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
    shape: list[int | str]  # ints, or strings naming dynamic dims ("batch", "sequence")
    dtype: str


def _from_dict(cls, d, where: str):
    """`cls(**d)` for a dict read from JSON: fields a newer minor version added are dropped, missing and
    mistyped fields are named."""
    if not isinstance(d, dict):
        raise ArtifactError(f"{where} should be an object, got {d!r}; rebuild the artifact with `python -m export`")
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ArtifactError(f"{where} lacks the field(s) {', '.join(missing)}; rebuild the artifact with "
                            "`python -m export`")
    known = {f.name: d[f.name] for f in fields if f.name in d}
    for name in ("inputs", "outputs", "state"):
        if name in known and isinstance(known[name], list):
            known[name] = [_from_dict(TensorSpec, s, f"{where}: {name}[{i}]") for i, s in enumerate(known[name])]
    problems = type_problems(cls, known)
    if problems:
        raise ArtifactError(f"{where}: {'; '.join(problems)}; rebuild the artifact with `python -m export`")
    return cls(**known)


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
    format_minor: int = FORMAT_MINOR

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path} is corrupt ({e}); rebuild the artifact with `python -m export`") from e
        version = d.get("format_version") if isinstance(d, dict) else None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(f"{path} has format version {version}, newer than this runtime reads "
                                f"({FORMAT_VERSION}); upgrade next-deploy or re-export with this version")
        d.setdefault("format_minor", 0)   # written before minor versions existed
        manifest = _from_dict(cls, d, str(path))
        problems = manifest.problems()
        if problems:
            raise ArtifactError(f"{path} contradicts itself: {'; '.join(problems[:3])}; the manifest was edited "
                                "or damaged, rebuild the artifact with `python -m export`")
        for target, files in manifest.targets.items():
            for role, name in files.get("files", {}).items():
                if not (directory / name).is_file():
                    raise ArtifactError(f"{directory / name} ({target} {role}) is missing: the artifact is "
                                        "incomplete; rebuild it with `python -m export`")
        return manifest

    def problems(self) -> list[str]:
        """Where the manifest's facts disagree with each other (vocab, state, capacity, dtypes)."""
        from model.config import Qwen3NextConfig
        try:
            vocab = Qwen3NextConfig.from_dict(self.model_config).vocab_size
        except ConfigError as e:
            return [f"model_config: {e}"]
        problems = [] if self.dtype in DTYPES else [f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}"]
        if self.max_batch < 1 or self.max_seq_len < 2:
            problems.append(f"max_batch {self.max_batch} and max_seq_len {self.max_seq_len} must be at least 1 and 2")
        state = [(s.name, s.shape, s.dtype) for s in self.state]
        if [(s.name, s.shape, s.dtype) for s in self.inputs[1:]] != state or self.inputs[:1] != \
                [TensorSpec("input_ids", ["batch", "sequence"], "int64")]:
            problems.append("inputs are not input_ids followed by the state")
        if [(s.name, s.shape, s.dtype) for s in self.outputs[1:]] != [(f"present.{n}", sh, d) for n, sh, d in state]:
            problems.append("outputs after the logits are not the state")
        logits = [(s.name, s.shape, s.dtype) for s in self.outputs[:1]]
        if logits != [("logits", ["batch", vocab], "float32")]:
            problems.append(f"the first output should be logits ['batch', {vocab}] float32 for model_config's "
                            f"vocab_size {vocab}, not {' '.join(map(str, logits[0])) if logits else 'missing'}")
        for name, shape, dtype in state:
            kind = name.split(".")[0]
            want = {"recurrent_state": "float32", "lengths": "int64"}.get(kind, self.dtype)
            if dtype != want:
                problems.append(f"state {name} is {dtype}, not {want}")
            if kind in ("key_cache", "value_cache") and (len(shape) != 4 or shape[2] != self.max_seq_len):
                problems.append(f"state {name} has shape {shape}, which does not hold max_seq_len "
                                f"{self.max_seq_len} tokens")
        return problems

    def check_graph(self, file: str, inputs: list[TensorSpec], outputs: list[TensorSpec], named: bool) -> None:
        """Refuse a graph file whose inputs or outputs are not the manifest's: a static dim in the file must
        equal the manifest's, and a dim the manifest names ("batch") may be anything. Unnamed graph tensors
        (`named` False) are matched by position."""
        for kind, graph, specs in (("inputs", inputs, self.inputs), ("outputs", outputs, self.outputs)):
            problem = None
            if len(graph) != len(specs):
                problem = f"{len(graph)} {kind}, the manifest lists {len(specs)}"
            for g, s in zip(graph, specs):
                if problem:
                    break
                if named and g.name != s.name:
                    problem = f"{kind} include {g.name} where the manifest has {s.name}"
                elif g.dtype != s.dtype or len(g.shape) != len(s.shape) or any(
                        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(g.shape, s.shape)):
                    problem = f"{s.name} is {g.shape} {g.dtype} in the file, {s.shape} {s.dtype} in the manifest"
                elif s.shape[:1] == ["batch"] and isinstance(g.shape[0], int) and g.shape[0] < self.max_batch:
                    problem = f"{s.name} takes a batch of {g.shape[0]} only, the manifest's max_batch is " \
                              f"{self.max_batch}"
            if problem:
                raise ArtifactError(f"{file} does not match manifest.json ({problem}); the artifact was modified "
                                    "or assembled from different exports, rebuild it with `python -m export`")
