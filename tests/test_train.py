"""Training: the loss falls, Ctrl-C saves, --resume continues exactly, checkpoints load, bad corpora are named."""

import json
import os
import signal

import pytest

from model import DataError, Qwen3NextForCausalLM
from model.tokenizer import Tokenizer
from train.__main__ import main as train_main
from train.trainer import Trainer, TrainConfig

MICRO = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
             linear_key_head_dim=16, linear_value_head_dim=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60)]
        (root / f"mod{i}.py").write_text("".join(lines))
    (root / ".hidden").write_text("skipped")
    return root


def config(tmp_path, corpus, **kw):
    defaults = dict(out=str(tmp_path / "run"), data=str(corpus), model_overrides=MICRO,
                    cache_dir=str(tmp_path / "cache"),
                    steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4, save_every=4,
                    log_every=100, device="cpu", sample_tokens=0)
    return TrainConfig(**{**defaults, **kw})


def losses(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_loss_goes_down_and_checkpoint_loads(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=40, eval_every=10)
    Trainer(cfg).train()
    log = losses(cfg.out)
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert vals[-1] < vals[0] - 1.0
    model = Qwen3NextForCausalLM.from_pretrained(cfg.out)
    tok = Tokenizer.load(cfg.out)
    assert model.config.eos_token_id == tok.eos_id and model.config.vocab_size >= tok.vocab_size
    assert (tmp_path / "run" / "checkpoints" / "step-0000040" / "trainer_state.pt").is_file()


def test_interrupt_saves_and_resume_matches_uninterrupted_run(tmp_path, corpus, monkeypatch):
    straight = config(tmp_path / "a", corpus)
    Trainer(straight).train()

    interrupted = config(tmp_path / "b", corpus)
    trainer = Trainer(interrupted)
    real_step = trainer.train_step

    def step_then_ctrl_c():
        loss = real_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)   # what Ctrl-C delivers; handled after the step completes
        return loss
    monkeypatch.setattr(trainer, "train_step", step_then_ctrl_c)
    result = trainer.train()
    assert result["interrupted"] and result["checkpoint"].endswith("step-0000003")

    resumed = Trainer(interrupted)
    resumed.resume()
    assert resumed.step == 3
    resumed.train()
    a, b = losses(straight.out), losses(interrupted.out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6, abs=0)


def test_cli_end_to_end_and_resume_errors(tmp_path, corpus, capsys):
    overrides = {**MICRO, "max_position_embeddings": 64}   # an override of a field the trainer also sets
    args = ["--data", str(corpus), "--out", str(tmp_path / "cli"), "--steps", "3", "--batch-size", "2",
            "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--model-config", json.dumps(overrides),
            "--sample-tokens", "5", "--device", "cpu"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "sample:" in out and "saved" in out
    assert train_main(args[:4] + ["--resume", "--steps", "4"]) == 0    # resume takes the run's own settings
    assert len(losses(tmp_path / "cli")) == 4
    assert Qwen3NextForCausalLM.from_pretrained(tmp_path / "cli").config.max_position_embeddings == 64
    assert train_main(["--out", str(tmp_path / "fresh"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_corpora(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        Trainer(config(tmp_path, empty))
    with pytest.raises(DataError, match="does not exist"):
        Trainer(config(tmp_path, tmp_path / "missing"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("x = 1\n" * 4)
    with pytest.raises(DataError, match="too few for two sequences"):
        Trainer(config(tmp_path, small, seq_len=512))
    assert train_main(["--data", str(empty), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "error: the corpus" in capsys.readouterr().err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "stdlib" in text


def test_gradient_accumulation_equals_the_larger_batch(tmp_path, corpus):
    """Two micro-batches of 2 accumulate to the same update as one batch of the same 4 sequences."""
    import torch
    whole = Trainer(config(tmp_path / "a", corpus, batch_size=4, grad_accum=1))
    split = Trainer(config(tmp_path / "b", corpus, batch_size=2, grad_accum=2))
    batch = whole.data.train_batch(0, 4, whole.cfg.seed)
    split.data.train_batch = lambda position, size, seed: batch[position:position + size]
    whole.data.train_batch = lambda position, size, seed: batch
    assert whole.train_step() == pytest.approx(split.train_step(), rel=1e-5)
    assert split.position == whole.position == 4
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
