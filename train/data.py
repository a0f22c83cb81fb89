"""Corpus -> tokenizer -> token cache -> packed fixed-length sequences with a held-out validation split.

The default corpus is the Python standard library's own source on this machine (always present, no download).
Tokenized corpora are cached by content fingerprint, so a second run (or a resume) does not tokenize again.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from model.errors import DataError
from model.io import atomic_path
from model.tokenizer import EOS, Tokenizer


def default_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_corpus_files(data: str | os.PathLike | None) -> list[Path]:
    """A text file, a directory of text files (recursively, hidden files skipped), or None for the stdlib."""
    if data is None:
        root = default_corpus_root()
        # The test suites are large and repetitive; the library proper is the better corpus.
        return sorted(p for p in root.rglob("*.py")
                      if not {"site-packages", "test", "tests", "idlelib"} & set(p.relative_to(root).parts))
    path = Path(data)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    raise DataError(f"--data {path} does not exist; pass a text file, a directory of text files, "
                    "or leave --data out to use the Python standard library's source")


def read_documents(files: list[Path]) -> list[str]:
    docs = []
    for f in files:
        raw = f.read_bytes()
        if b"\0" in raw[:8192]:  # binary file in a data directory
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"the corpus ({len(files)} files) holds no text; point --data at text files")
    return docs


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def tokenize_corpus(docs: list[str], tokenizer: Tokenizer, cache_file: Path | None) -> np.ndarray:
    """All documents as one token stream, each followed by EOS. Cached as .npy when `cache_file` is given."""
    if cache_file is not None and cache_file.is_file():
        return np.load(cache_file, mmap_mode="r")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    pieces, batch = [], 64
    for i in tqdm(range(0, len(docs), batch), desc="tokenizing", unit="batch", leave=False):
        for ids in tokenizer.encode_batch(docs[i:i + batch]):
            pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
    tokens = np.concatenate(pieces)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, tokens)
    return tokens


@dataclass
class PackedDataset:
    """Non-overlapping windows of seq_len + 1 tokens (input and shifted target), split into train and val."""
    tokens: np.ndarray
    seq_len: int
    val_fraction: float = 0.02

    def __post_init__(self):
        n = (len(self.tokens) - 1) // self.seq_len
        if n < 2:
            raise DataError(f"the corpus has {len(self.tokens)} tokens: too few for two sequences of "
                            f"--seq-len {self.seq_len}; add text or lower --seq-len")
        self.num_val = max(1, round(n * self.val_fraction))
        self.num_train = n - self.num_val
        self._order_key, self._order = None, None

    def sequence(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[i * self.seq_len: (i + 1) * self.seq_len + 1], dtype=np.int64)

    def train_batch(self, position: int, batch_size: int, seed: int) -> np.ndarray:
        """Sequences number position .. position+batch_size-1 of an endless stream that visits the training
        set in a fresh seeded order each epoch. Depends only on its arguments, so resuming is exact."""
        rows = []
        for p in range(position, position + batch_size):
            epoch, offset = divmod(p, self.num_train)
            rows.append(self.sequence(int(self._epoch_order(seed, epoch)[offset])))
        return np.stack(rows)

    def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        # One permutation per epoch, kept: drawing it for every row cost more than a GPU step on large corpora.
        if self._order_key != (seed, epoch):
            self._order = np.random.default_rng([seed, epoch]).permutation(self.num_train)
            self._order_key = (seed, epoch)
        return self._order

    def val_batches(self, batch_size: int, max_batches: int):
        ids = list(range(self.num_train, self.num_train + self.num_val))
        for b in range(0, min(len(ids), batch_size * max_batches), batch_size):
            yield np.stack([self.sequence(i) for i in ids[b:b + batch_size]])


def prepare(data: str | None, seq_len: int, vocab_size: int, tokenizer_path: str | None,
            cache_dir: Path, val_fraction: float = 0.02) -> tuple[Tokenizer, PackedDataset]:
    files = list_corpus_files(data)
    if not files:
        raise DataError(f"--data {data} holds no files; point it at text")
    fp = fingerprint(files)
    docs = None
    if tokenizer_path:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tok_file = cache_dir / f"tokenizer-{fp}-{vocab_size}.json"
        if tok_file.is_file():
            tokenizer = Tokenizer.load(tok_file)
        else:
            docs = read_documents(files)
            print(f"training a {vocab_size}-token byte-level BPE tokenizer on {len(docs)} documents", flush=True)
            tokenizer = Tokenizer.train(docs, vocab_size)
            cache_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(tok_file) as tmp:
                tmp.write_text(tokenizer.to_json())
    if tokenizer.eos_id is None:
        raise DataError(f"the tokenizer has no {EOS} token to separate documents; train one with `python -m train`")
    tok_hash = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]
    cache_file = cache_dir / f"tokens-{fp}-{tok_hash}.npy"
    if docs is None and not cache_file.is_file():
        docs = read_documents(files)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokens = tokenize_corpus(docs or [], tokenizer, cache_file)
    return tokenizer, PackedDataset(tokens, seq_len, val_fraction)
