"""Export and runtime with the inputs users get wrong: an --out that holds something else, signals half-way,
damaged or edited artifacts, states from elsewhere. One small artifact, built for batch 1, serves the module."""

import io
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from export.__main__ import main as export_main
from model import CapacityError, Qwen3NextForCausalLM
from model.tokenizer import Tokenizer
from runtime import ArtifactError, InputError
from tests.conftest import ROOT, one_line_error, python_m, randomize, small_config, snapshot

pytest.importorskip("onnxruntime", reason="the onnxruntime target needs onnxruntime (dev extra)")
pytestmark = pytest.mark.slow

SMALL_EXPORT = ["--max-seq-len", "24", "--verify-tokens", "6"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "ckpt"
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 40], vocab_size=300)
    randomize(Qwen3NextForCausalLM(small_config(vocab_size=300, max_position_embeddings=64,
                                                eos_token_id=tok.eos_id)), seed=4).save_pretrained(path)
    tok.save(path)
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "optimizer.pt").write_bytes(b"state a run would lose")
    return path


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "batch1"
    assert export_main([str(checkpoint), "--out", str(out), "--max-batch", "1", *SMALL_EXPORT]) == 0
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    """A scratch copy of the artifact to damage."""
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def edit_manifest(directory: Path, change) -> None:
    m = json.loads((directory / "manifest.json").read_text())
    change(m)
    (directory / "manifest.json").write_text(json.dumps(m))


# ---- export: batch 1, opsets, tokenizer -------------------------------------------------------------------------


def test_batch_one_exports_and_checks_itself_with_one_row(artifact):
    m = json.loads((artifact / "manifest.json").read_text())
    assert m["max_batch"] == 1 and m["format_version"] == 1 and m["format_minor"] == 4
    import onnx
    opset = {o.domain: o.version for o in onnx.load(str(artifact / "model.onnx")).opset_import}[""]
    assert m["targets"]["onnxruntime"]["opset"] == opset == 21
    for target in ("torch", "onnxruntime"):
        assert m["parity"][target]["batch"] == 1 and m["parity"][target]["rel_error"] < 1e-4
        engine = runtime.load(artifact, backend=target)
        state = engine.new_state(1)
        engine.prefill([[3, 4, 5]], state)
        engine.decode([6], state)
        with pytest.raises(CapacityError, match="--max-batch 2"):
            engine.new_state(2)


@pytest.mark.parametrize("opset", [18, 25])
def test_lowest_and_highest_opset_export_and_the_manifest_says_which(checkpoint, artifact, tmp_path, opset, capsys):
    """18 replaces an earlier artifact (allowed); 25 goes into a foreign directory with --overwrite, from a
    checkpoint without a tokenizer (a one-line warning)."""
    source = checkpoint
    if opset == 18:
        out = Path(shutil.copytree(artifact, tmp_path / "earlier"))
    else:
        source = Path(shutil.copytree(checkpoint, tmp_path / "no-tokenizer"))
        (source / "tokenizer.json").unlink()
        out = tmp_path / "foreign"
        out.mkdir()
        (out / "notes.txt").write_text("replaced, as --overwrite says")
    args = [str(source), "--out", str(out), "--target", "onnxruntime", "--opset", str(opset), *SMALL_EXPORT]
    assert export_main(args + (["--overwrite"] if opset == 25 else [])) == 0
    import onnx
    m = json.loads((out / "manifest.json").read_text())
    assert m["targets"]["onnxruntime"]["opset"] == opset
    assert {o.domain: o.version for o in onnx.load(str(out / "model.onnx")).opset_import}[""] == opset
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    if opset == 25:
        warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "no tokenizer.json" in warning[0] and m["tokenizer"] is None
        assert not (out / "notes.txt").exists()
        engine = runtime.load(out)
        with pytest.raises(InputError, match="no tokenizer.*--prompt-ids"):
            engine.generate("def")
        # Token ids need no tokenizer: the CLI prints the prompt's ids, then the greedy continuation's.
        from runtime.__main__ import main as runtime_main
        expected = list(engine.generate_ids([5, 9], max_new_tokens=4))
        assert runtime_main([str(out), "--prompt-ids", "5", "9", "--max-new-tokens", "4", "--temperature", "0"]) == 0
        assert capsys.readouterr().out == " ".join(map(str, [5, 9, *expected])) + "\n"
        assert runtime_main([str(out), "--prompt-ids", "5", "99999"]) == 2
        assert "outside the vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["17", "26"])
def test_opsets_that_do_not_work_are_refused_when_parsed(checkpoint, tmp_path, opset, capsys):
    with pytest.raises(SystemExit) as refused:
        export_main([str(checkpoint), "--out", str(tmp_path / "a"), "--opset", opset])
    assert refused.value.code == 2 and "--opset: invalid choice" in capsys.readouterr().err


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(checkpoint, tmp_path, capsys):
    small = Path(shutil.copytree(checkpoint, tmp_path / "small-vocab"))
    randomize(Qwen3NextForCausalLM(small_config(vocab_size=101))).save_pretrained(small)
    assert export_main([str(small), "--out", str(tmp_path / "a"), *SMALL_EXPORT]) == 2
    assert re.search("the tokenizer has \\d+ tokens but the model.s vocab_size is 101", capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


# ---- export: nothing lost -------------------------------------------------------------------------------------


def test_out_that_is_the_checkpoint_is_refused_and_nothing_changes(checkpoint):
    before = snapshot(checkpoint.parent)
    last = one_line_error(python_m("export", checkpoint, "--out", checkpoint, "--overwrite"))
    assert f"--out {checkpoint} is the input" in last
    assert snapshot(checkpoint.parent) == before


@pytest.mark.parametrize("where", ["parent", "inside", "foreign", "cwd"])
def test_out_that_holds_something_else_is_refused_and_nothing_changes(checkpoint, tmp_path, where, monkeypatch,
                                                                      capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    out = {"parent": checkpoint.parent, "inside": checkpoint / "artifact", "foreign": foreign, "cwd": Path(".")}[where]
    monkeypatch.chdir(foreign)
    before = snapshot(checkpoint.parent), snapshot(foreign)
    assert export_main([str(checkpoint), "--out", str(out), *SMALL_EXPORT]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out")
    assert (snapshot(checkpoint.parent), snapshot(foreign)) == before


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_export_leaves_the_earlier_artifact_and_no_temporary_files(checkpoint, copy, sig, code):
    before = snapshot(copy.parent)
    p = subprocess.Popen([sys.executable, "-m", "export", str(checkpoint), "--out", str(copy), *SMALL_EXPORT],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = ""
    while "building" not in seen and p.poll() is None:   # then the artifact's temporary directory exists
        seen += p.stdout.read(1)
    assert any(p.name.startswith(".copy.") for p in copy.parent.iterdir())
    p.send_signal(sig)
    assert p.wait(timeout=120) == code
    err = p.stderr.read()
    assert "Traceback" not in err and err.strip().splitlines()[-1] in ("terminated", "interrupted")
    assert snapshot(copy.parent) == before


# ---- runtime: damaged and edited artifacts ----------------------------------------------------------------------


@pytest.mark.parametrize("backend,file", [("onnxruntime", "model.onnx"), ("torch", "prefill.pt2"),
                                          ("torch", "decode.pt2")])
def test_a_truncated_graph_file_is_one_clear_error(copy, backend, file):
    data = (copy / file).read_bytes()
    (copy / file).write_bytes(data[: len(data) // 2])
    last = one_line_error(python_m("runtime", copy, "--prompt", "def", "--backend", backend))
    assert f"{file} cannot be loaded" in last and "rebuild the artifact" in last


def change_state(m, field, value, names=("key_cache", "value_cache")):
    for specs in (m["inputs"], m["outputs"], m["state"]):
        for spec in specs:
            if spec["name"].removeprefix("present.").split(".")[0] in names:
                spec[field] = value(spec[field])


def more_capacity(m):
    m["max_seq_len"] = 48
    change_state(m, "shape", lambda s: [*s[:2], 48, *s[3:]])


def more_vocab(m):
    m["model_config"]["vocab_size"] = 400
    m["outputs"][0]["shape"][1] = 400


@pytest.mark.parametrize("change,problem", [
    (more_capacity, "key_cache.3 is .* in the file"),
    (more_vocab, "logits is .* 300.* in the file, .* 400"),
    (lambda m: [m.update(dtype="float16"), change_state(m, "dtype", lambda d: "float16",
                                                         names=("conv_state", "key_cache", "value_cache"))],
     "conv_state.0 is .*float32 in the file.*float16"),
    (lambda m: change_state(m, "shape", lambda s: [*s[:3], 5], names=("recurrent_state",)),
     "recurrent_state.0 is .* in the file"),
    (lambda m: m.update(max_batch=2), "input_ids takes a batch of 1 only, the manifest's max_batch is 2"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_manifest_that_no_longer_matches_the_graph_is_refused(copy, change, problem, backend):
    edit_manifest(copy, change)
    with pytest.raises(ArtifactError, match=f"does not match manifest.json .*{problem}"):
        runtime.load(copy, backend=backend)


@pytest.mark.parametrize("change,problem", [
    (lambda m: m.update(max_seq_len=48), "key_cache.3 has shape .* does not hold max_seq_len 48"),
    (lambda m: m["model_config"].update(vocab_size=400), "logits \\['batch', 400\\] float32 .* not logits"),
    (lambda m: change_state(m, "dtype", lambda d: "float16", names=("recurrent_state",)),
     "recurrent_state.0 is float16, not float32"),
    (lambda m: [m.pop("dtype"), m.pop("state")], "lacks the field\\(s\\) dtype, state"),
    (lambda m: m["inputs"][1].pop("shape"), "inputs\\[1\\] lacks the field\\(s\\) shape"),
    (lambda m: m.update(max_batch="1"), "max_batch should be a whole number, got '1'"),
    (lambda m: m.update(format_version=2), "newer than this runtime reads"),
])
def test_a_manifest_that_contradicts_itself_or_lacks_fields_is_named(copy, change, problem):
    edit_manifest(copy, change)
    with pytest.raises(ArtifactError, match=problem):
        runtime.load(copy)


def test_manifests_of_a_newer_minor_version_and_of_format_1_0_load(copy):
    def newer(m):
        m.update(format_minor=7, speculative_decoding={"draft": "x"})
        m["state"][0]["layout"] = "contiguous"
    edit_manifest(copy, newer)
    runtime.load(copy, backend="torch")
    edit_manifest(copy, lambda m: m.pop("format_minor"))
    assert runtime.load(copy).manifest.format_minor == 0


# ---- runtime: states and prompts ---------------------------------------------------------------------------------


def test_a_state_from_another_engine_is_refused(artifact):
    ort, torch_engine = runtime.load(artifact), runtime.load(artifact, backend="torch")
    theirs, mine = torch_engine.new_state(1), ort.new_state(1)
    with pytest.raises(InputError, match="made by another engine .*TorchExportBackend"):
        ort.prefill([[1, 2]], theirs)
    with pytest.raises(InputError, match="another engine"):
        ort.decode([1], theirs)
    with pytest.raises(InputError, match="another engine"):
        mine.restore(theirs)
    assert mine.lengths.tolist() == [0]


def test_interactive_reports_an_over_long_prompt_and_goes_on(artifact, monkeypatch, capsys):
    from runtime.__main__ import main as runtime_main
    monkeypatch.setattr(sys, "stdin", io.StringIO("def " * 40 + "\ndef add\n\n"))
    assert runtime_main([str(artifact), "--interactive", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "error: the prompt is" in err and "shorten the prompt" in err
    assert "def add" in out


def test_max_new_tokens_beyond_capacity_is_capped_with_a_note(artifact):
    r = python_m("runtime", artifact, "--prompt", "def add", "--max-new-tokens", "1000", "--temperature", "0")
    notes = r.stderr.strip().splitlines()
    assert r.returncode == 0 and r.stdout.startswith("def add")
    assert len(notes) == 1 and notes[0].startswith("note: 1000 new tokens do not fit; the state holds 24 tokens")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_on_a_machine_without_it_is_one_error(artifact, checkpoint):
    from model.device import DeviceError
    for backend in ("eager", "torch"):
        with pytest.raises(DeviceError, match="needs a CUDA GPU"):
            runtime.load(artifact, backend=backend, device="cuda")
    assert "needs a CUDA GPU" in one_line_error(python_m("model.generate", checkpoint, "--device", "cuda"))
