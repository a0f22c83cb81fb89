import numpy as np
import pytest

from model.sampling import Sampler, SamplingConfig
from model.tokenizer import Tokenizer
from model.errors import CheckpointError


@pytest.fixture(scope="module")
def tok():
    texts = ["def add(a, b):\n    return a + b\n" * 30, "naïve café — ünïcode ✓ 日本語\n" * 30]
    return Tokenizer.train(texts, vocab_size=400)


def test_round_trip_and_reload(tok, tmp_path):
    text = "def add(x, y):\n    return x + y  # café ✓ 日本"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert again.eos_id == tok.eos_id is not None and again.pad_id != again.eos_id


def test_stream_holds_back_partial_characters(tok):
    text = "日本語 ✓ café"
    ids = tok.encode(text)
    pieces = list(tok.stream(ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_transformers_loads_our_tokenizer(tok, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("def add(a, b)")["input_ids"] == tok.encode("def add(a, b)")


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_greedy_and_seeded_sampling():
    logits = np.random.default_rng(0).normal(size=(3, 50))
    assert (Sampler(SamplingConfig())(logits) == logits.argmax(-1)).all()
    a = Sampler(SamplingConfig(temperature=1.0, seed=7))(logits)
    b = Sampler(SamplingConfig(temperature=1.0, seed=7))(logits)
    assert (a == b).all()


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    top_k = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=0))
    assert {int(top_k(logits)[0]) for _ in range(200)} == {0, 1}
    top_p = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))   # 0.5 + 0.3 reaches 0.7
    assert {int(top_p(logits)[0]) for _ in range(200)} == {0, 1}
    nucleus_of_one = Sampler(SamplingConfig(temperature=1.0, top_p=0.1, seed=0))
    assert {int(nucleus_of_one(logits)[0]) for _ in range(50)} == {0}


def test_repetition_penalty_demotes_seen_tokens():
    logits = np.array([[2.0, 1.9, -1.0]])
    sampler = Sampler(SamplingConfig(repetition_penalty=1.5))
    assert sampler(logits, [[0]])[0] == 1
    assert sampler(logits, [[2]])[0] == 0


def test_invalid_sampling_settings():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
