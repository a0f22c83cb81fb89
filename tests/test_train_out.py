"""`python -m train --out`: an earlier run is never lost or mixed with a new one, a moved run resumes where it is,
and bad settings are refused before anything is written."""

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, one_line_error, python_m, snapshot
from tests.test_train import MICRO
from train.__main__ import main as train_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text("".join(f"def f{j}(x):\n    return x * {j} + {j % 7}\n" for j in range(300)))
    return path


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A finished four-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("runs")
    argv = settings(corpus, root / "run", root / "cache", "--steps", "4", "--save-every", "2")
    assert train_main(argv) == 0
    return root / "run"


def settings(corpus, out, cache, *more):
    return ["--data", str(corpus), "--out", str(out), "--cache-dir", str(cache), "--model-config", json.dumps(MICRO),
            "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--sample-tokens", "0", *map(str, more)]


@pytest.fixture
def copy(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / "copy"))


def log_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_new_run_into_an_earlier_one_is_refused_and_nothing_changes(run, corpus, tmp_path):
    before = snapshot(run)
    last = one_line_error(python_m("train", *settings(corpus, run, tmp_path / "cache", "--steps", "2")))
    assert "holds a training run" in last and "--resume" in last and "--overwrite" in last
    assert snapshot(run) == before


def test_overwrite_starts_afresh_and_removes_only_what_the_run_wrote(copy, corpus, tmp_path):
    (copy / "notes.txt").write_text("mine")
    (copy / "checkpoints" / "README").write_text("mine too")
    assert train_main(settings(corpus, copy, tmp_path / "cache", "--steps", "1", "--overwrite")) == 0
    assert log_steps(copy) == [1]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["README", "step-0000001"]
    assert (copy / "notes.txt").read_text() == "mine"


def test_a_directory_that_is_not_a_run_needs_overwrite_and_keeps_its_files(corpus, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    assert train_main(settings(corpus, other, tmp_path / "cache", "--steps", "1")) == 2
    assert "not an earlier training run" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    assert train_main(settings(corpus, other, tmp_path / "cache", "--steps", "1", "--overwrite")) == 0
    assert (other / "thesis.tex").read_text() == "years of work" and log_steps(other) == [1]


def test_a_moved_run_resumes_where_it_is_now(run, tmp_path, monkeypatch):
    moved = Path(shutil.copytree(run, tmp_path / "elsewhere" / "moved"))
    monkeypatch.chdir(tmp_path)   # not where the run was trained from either
    before = snapshot(run)
    assert train_main(["--out", str(moved), "--resume", "--steps", "5"]) == 0
    assert log_steps(moved) == [1, 2, 3, 4, 5] and (moved / "checkpoints" / "step-0000005").is_dir()
    assert snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_trainer_state_on_resume_names_the_checkpoint_to_delete(copy, damage):
    state = copy / "checkpoints" / "step-0000004" / "trainer_state.pt"
    if damage == "missing":
        state.unlink()
    else:
        state.write_bytes(state.read_bytes()[:1000])
    last = one_line_error(python_m("train", "--out", copy, "--resume", "--steps", "6"))
    assert "trainer_state.pt is unreadable" in last and "delete" in last and "step-0000004" in last


def test_resuming_a_finished_run_asks_for_more_steps(run, capsys):
    before = snapshot(run)
    assert train_main(["--out", str(run), "--resume"]) == 2
    assert "at step 4 of its 4; pass a larger --steps" in capsys.readouterr().err
    assert train_main(["--out", str(run), "--resume", "--overwrite"]) == 2
    assert "pass one" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("extra,problem", [
    (["--model-config", "[2]"], "must be a JSON object"),
    (["--model-config", '{"num_layers": 2}'], "did you mean 'num_hidden_layers'"),
    (["--model-config", '{"num_attention_heads": 0}'], "num_attention_heads must be at least 1"),
    (["--model-config", '{"hidden_size": "32"}'], "hidden_size should be a whole number"),
    (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "cuda"),
    (["--device", "gpu"], "unknown device 'gpu'"),
])
def test_bad_settings_are_refused_before_anything_is_written(corpus, tmp_path, extra, problem, capsys):
    argv = settings(corpus, tmp_path / "new", tmp_path / "cache", "--steps", "1") + extra
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]
    assert not (tmp_path / "new").exists()


def test_ctrl_c_while_the_data_is_prepared_leaves_no_partial_files(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(60):   # enough text that preparing it takes a few seconds
        (data / f"{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(25000)))
    cache, out = tmp_path / "cache", tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "train", *settings(data, out, cache)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout.readline().startswith("training a")   # the tokenizer, then the token stream
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    err = p.stderr.read()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert not out.exists() and not [f for f in cache.glob("*") if f.name.startswith(".")]
