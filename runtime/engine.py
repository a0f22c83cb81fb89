"""The engine API applications use, whatever backend runs the model.

    eng = runtime.load(ARTIFACT_DIR, backend="onnxruntime", device="cpu")
    state = eng.new_state(batch_size=2)
    logits = eng.prefill([[1, 2, 3], [4, 5]], state)     # rows may differ in length -> [B, vocab]
    logits = eng.decode([7, 8], state)                    # one token per row -> [B, vocab]
    for piece in eng.generate("def main(", max_new_tokens=64, temperature=0.8, top_p=0.95): ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from model.errors import CapacityError, NextDeployError
from model.generate import fit_new_tokens, generate_ids, generate_text
from model.sampling import Sampler, SamplingConfig

from .manifest import Manifest


class InputError(NextDeployError):
    """Token ids, batch or arrays that do not fit the artifact."""


class State:
    """One backend's state tensors for a batch, plus each row's length kept on the host for checks."""

    def __init__(self, engine: "Engine", tensors, lengths: np.ndarray):
        self.engine = engine
        self.tensors = tensors
        self.lengths = lengths

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def clone(self) -> "State":
        """An independent copy: fork a conversation, or keep a snapshot to restore later."""
        return State(self.engine, self.engine.backend.clone_state(self.tensors), self.lengths.copy())

    def restore(self, snapshot: "State") -> None:
        """Make this state equal to `snapshot` (which is left unchanged)."""
        self.engine.check_state(snapshot)
        if snapshot.batch_size != self.batch_size:
            raise InputError(f"the snapshot holds {snapshot.batch_size} rows and this state {self.batch_size}; "
                             "restore a snapshot taken (with clone()) from a state of the same batch size")
        copy = snapshot.clone()
        self.tensors, self.lengths = copy.tensors, copy.lengths


class Engine:
    def __init__(self, directory: Path, manifest: Manifest, backend, tokenizer=None):
        self.directory = directory
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        self.vocab_size = manifest.model_config["vocab_size"]
        self.max_batch = manifest.max_batch
        self.max_seq_len = manifest.max_seq_len

    def new_state(self, batch_size: int = 1) -> State:
        if not 1 <= batch_size <= self.max_batch:
            raise CapacityError(f"batch_size {batch_size} is outside 1..{self.max_batch}, the batch this artifact "
                                f"was built for; re-export with --max-batch {max(batch_size, 1)}")
        return State(self, self.backend.new_state(batch_size), np.zeros(batch_size, dtype=np.int64))

    # ---- steps ---------------------------------------------------------------------------------

    def check_state(self, state: State) -> None:
        """Another engine's state has another backend's buffers, and possibly another shape or capacity."""
        if not isinstance(state, State):
            raise InputError(f"expected a State from this engine's new_state(), got a {type(state).__name__}")
        if state.engine is not self:
            raise InputError(f"this state was made by another engine ({state.engine.directory}, "
                             f"{type(state.engine.backend).__name__}); make states for this engine with its "
                             "new_state()")

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.dtype.kind not in "iu":
            raise InputError(f"token ids must be integers, got an array of {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise InputError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1}); "
                             "encode text with this artifact's tokenizer")
        return ids.astype(np.int64)

    def _check_room(self, state: State, added: list[int]) -> None:
        """Before anything runs: `added[b]` more tokens for row b must fit, so a refused call changes nothing."""
        after = state.lengths + np.asarray(added)
        if after.max() > self.max_seq_len:
            b = int(after.argmax())
            raise CapacityError(f"{added[b]} more tokens would take a row to {int(after[b])} tokens, past "
                                f"the {self.max_seq_len} this artifact was built for; shorten the prompt or "
                                "re-export with a larger --max-seq-len")

    def prefill(self, token_ids, state: State) -> np.ndarray:
        """Feed each row's tokens, continuing from `state`. `token_ids`: [B, T] array, or B lists of any lengths
        (rows of different lengths run one at a time). Returns each row's last-position logits [B, vocab]."""
        self.check_state(state)
        rows = [np.asarray(r) for r in token_ids] if not isinstance(token_ids, np.ndarray) else list(token_ids)
        if len(rows) != state.batch_size:
            raise InputError(f"got {len(rows)} rows of tokens for a state of {state.batch_size} rows")
        if any(r.ndim != 1 or r.size == 0 for r in rows):
            raise InputError("each row of token_ids must be a non-empty 1-D sequence of ids")
        rows = [self._check_ids(r) for r in rows]
        self._check_room(state, [len(r) for r in rows])
        if len({len(r) for r in rows}) == 1:
            return self._run(np.stack(rows), state, np.arange(state.batch_size))
        return np.concatenate([self._run(r[None], state, np.array([b])) for b, r in enumerate(rows)])

    def decode(self, next_ids, state: State) -> np.ndarray:
        """One token per row ([B] or [B, 1]) -> logits [B, vocab]."""
        self.check_state(state)
        ids = np.asarray(next_ids)
        if ids.ndim == 2 and ids.shape[1] == 1:
            ids = ids[:, 0]
        if ids.ndim != 1 or len(ids) != state.batch_size:
            raise InputError(f"decode takes one token per row, shape [{state.batch_size}] or "
                             f"[{state.batch_size}, 1]; got shape {list(np.shape(next_ids))}")
        ids = self._check_ids(ids)
        self._check_room(state, [1] * state.batch_size)
        return self._run(ids[:, None], state, np.arange(state.batch_size))

    def _run(self, ids: np.ndarray, state: State, rows: np.ndarray) -> np.ndarray:
        logits = self.backend.step(ids, state.tensors, rows, state.batch_size)
        state.lengths[rows] += ids.shape[1]
        return logits

    # ---- text ----------------------------------------------------------------------------------

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[int] | None = None,
                 seed: int | None = None) -> Iterator[str]:
        """Stream a completion of `prompt` as text pieces. Stops at EOS (or any id in `stop`)."""
        if self.tokenizer is None:
            raise InputError(f"{self.directory} has no tokenizer; export from a checkpoint with tokenizer.json, or "
                             "give token ids (generate_ids; python -m runtime --prompt-ids)")
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        return generate_text(self.tokenizer, self._stream_ids(sampling), prompt, max_new_tokens, self.max_seq_len,
                             stop)

    def generate_ids(self, prompt_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, repetition_penalty: float = 1.0, stop: Sequence[int] | None = None,
                     seed: int | None = None) -> Iterator[int]:
        """Stream the token ids sampled after `prompt_ids` (a non-empty list of ids): generate() without text, for
        an application with a tokenizer of its own, or an artifact without one. Stops after `max_new_tokens` or at
        an id in `stop` (not yielded)."""
        ids = np.asarray(prompt_ids)
        if ids.ndim != 1 or not ids.size:
            raise InputError(f"prompt_ids must be a non-empty list of token ids; got shape {list(ids.shape)}")
        ids = self._check_ids(ids)
        budget = fit_new_tokens(len(ids), max_new_tokens, self.max_seq_len)
        sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty, seed)
        return self._stream_ids(sampling)(ids.tolist(), budget, set(stop or ()))

    def _stream_ids(self, sampling: SamplingConfig):
        """What generate() and generate_ids() run: (prompt ids, new tokens, stop ids) -> the sampled ids, from a
        fresh state made at the call. A backend that samples on its device overrides it
        (runtime/compiled_backend.py)."""
        sampler = Sampler(sampling)

        def stream(prompt_ids: list[int], budget: int, stop_ids: set[int]) -> Iterator[int]:
            state = self.new_state(1)
            return generate_ids(lambda ids: self._next_logits(ids, state), prompt_ids, budget, sampler, stop_ids)
        return stream

    def _next_logits(self, ids: list[int], state: State):
        return (self.prefill([ids], state) if len(ids) > 1 else self.decode(ids, state))[0]
