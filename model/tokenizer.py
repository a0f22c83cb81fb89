"""Byte-level BPE tokenizer (the `tokenizers` library), saved as tokenizer.json beside the model.

Torch-free, so applications that run ONNX artifacts can use it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError, ConfigError
from .io import atomic_write_text

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        self.eos_id = tok.token_to_id(EOS)
        self.pad_id = tok.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def bos_id(self) -> int | None:
        # Like Qwen, documents are separated by EOS; there is no distinct BOS token.
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def stream(self, ids: Iterable[int]) -> Iterator[str]:
        """Decode token by token, yielding text as soon as it is complete UTF-8 (multi-byte characters can span
        several byte-level tokens; a partial one decodes to U+FFFD and is held back until it completes)."""
        pending: list[int] = []
        for i in ids:
            pending.append(i)
            text = self.decode(pending)
            if text and not text.endswith("\ufffd"):
                yield text
                pending = []
        if pending:
            yield self.decode(pending)

    def to_json(self) -> str:
        return self._tok.to_str()

    def check_fits(self, vocab_size: int) -> None:
        if self.vocab_size > vocab_size:
            raise ConfigError(f"the tokenizer has {self.vocab_size} tokens but the model's vocab_size is "
                              f"{vocab_size}; use the tokenizer the model was trained with (python -m train saves it "
                              "beside the model) or a model whose vocab_size is at least the tokenizer's")

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        atomic_write_text(directory / TOKENIZER_FILE, self.to_json())
        # Lets transformers' AutoTokenizer load the directory as a PreTrainedTokenizerFast.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": PAD,
                  "bos_token": None, "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
        atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """`path` is a tokenizer.json file or a directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} not found; train a tokenizer with `python -m train` (it saves one "
                                  "beside the model) or pass --tokenizer PATH/tokenizer.json")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises a bare Exception on malformed JSON
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({e}); re-create it") from e

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)
