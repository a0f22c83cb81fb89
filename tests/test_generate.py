import pytest
import torch

from model import Qwen3NextForCausalLM
from model.generate import eager_step, generate_ids, main
from model.sampling import Sampler, SamplingConfig
from model.tokenizer import Tokenizer
from tests.conftest import randomize, small_config


@pytest.fixture
def checkpoint(tmp_path):
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 40], vocab_size=300)
    model = randomize(Qwen3NextForCausalLM(small_config(vocab_size=300, max_position_embeddings=64,
                                                        eos_token_id=tok.eos_id)), seed=2)
    model.save_pretrained(tmp_path)
    tok.save(tmp_path)
    return tmp_path


def test_greedy_generation_equals_full_forward_argmax(checkpoint):
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint)
    prompt = [5, 17, 33, 2]
    out = list(generate_ids(eager_step(model, model.new_state(1, 32)), prompt, 10, Sampler(SamplingConfig())))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


def test_cli_streams_text(checkpoint, capsys):
    assert main([str(checkpoint), "--prompt", "def add(", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def add(")


def test_cli_errors_name_the_fix(checkpoint, tmp_path, capsys):
    assert main([str(checkpoint), "--prompt", "def add(a, b): " * 40]) == 2
    assert "shorten the prompt" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:   # refused when parsed
        main([str(checkpoint), "--top-p", "0"])
    assert refused.value.code == 2 and "--top-p: must be in (0, 1]" in capsys.readouterr().err
