"""`python -m bench` on a tiny random model and a tiny artifact, with few steps (no timed assertions)."""

import json

import numpy as np
import pytest
import torch

from bench import measure, schema
from bench.__main__ import build_parser
from bench.__main__ import main as bench_main
from export import verify
from export.__main__ import main as export_main
from model import Qwen3NextForCausalLM, cli
from model.tokenizer import Tokenizer
from tests.conftest import randomize, small_config, terminated_at_call

pytest.importorskip("onnxruntime", reason="the artifact's onnxruntime target needs onnxruntime (dev extra)")
pytest.importorskip("transformers", reason="the hf backend needs transformers (dev extra)")
pytestmark = pytest.mark.slow

ACCURACY_STEPS, DRIFT_STEPS = 6, 8
FEW = ["--prompt-lengths", "8", "24", "1000", "--batches", "1", "2", "--warmup", "0", "--repeats", "1",
       "--decode-context", "4", "--decode-steps", "2", "--generate-prompt", "6", "--generate-tokens", "3",
       "--generate-repeats", "1", "--accuracy-steps", str(ACCURACY_STEPS), "--drift-steps", str(DRIFT_STEPS)]
QUICK = ["--prompt-lengths", "8", *FEW[4:-4], "--accuracy-steps", "0", "--drift-steps", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer.train(["def add(a, b):\n    return a + b\n" * 40], vocab_size=300)
    config = small_config(vocab_size=300, max_position_embeddings=128, eos_token_id=tok.eos_id)
    randomize(Qwen3NextForCausalLM(config), seed=7).save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    """The onnxruntime target only, so the torch backend shows up as not built."""
    out = tmp_path_factory.mktemp("art") / "artifact"
    assert export_main([str(checkpoint), "--out", str(out), "--target", "onnxruntime", "--max-batch", "2",
                        "--max-seq-len", "64", "--verify-tokens", "8"]) == 0
    return out


@pytest.fixture(scope="module")
def bench_report(artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "report"
    assert bench_main([str(artifact), "--out", str(out), *FEW, "--profile-steps", "3", "--profile-prefill", "9"]) == 0
    return out, json.loads((out / "report.json").read_text())


def run_cli(main, argv, capsys):
    """Exit code and stderr of the command as `python -m` runs it (cli.run)."""
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: main(argv))
    return e.value.code, capsys.readouterr().err


def test_report_schema_and_backends(bench_report):
    out, rep = bench_report
    assert schema.missing_fields(rep) == []
    assert rep["schema"] == schema.SCHEMA and rep["schema_version"] == schema.SCHEMA_VERSION
    assert rep["environment"]["device"]["name"] and rep["environment"]["packages"]["torch"] == torch.__version__
    assert len(rep["target"]["manifest_sha256"]) == 64 and rep["target"]["model_config"]["vocab_size"] == 300
    import runtime
    assert list(rep["backends"]) == [*runtime.BACKENDS, "hf"]
    for name in ("onnxruntime", "eager", "hf"):
        b = rep["backends"][name]
        assert b["status"] == "ok", (name, b["reason"])
        assert [r["prompt_length"] for r in b["prefill"]] == [8, 24, 64]       # 1000 clipped to capacity
        assert [r["batch"] for r in b["decode"]] == [1, 2]
        for r in b["prefill"] + b["decode"]:
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["repeats"] >= 1
        assert b["decode"][0]["bytes_per_step"]["total"] > b["decode"][0]["bytes_per_step"]["weights"] > 0
        assert b["generate"]["new_tokens"] == 3 and b["generate"]["how"].startswith("text")
        assert b["generate"]["prompt_tokens"] == 6
        assert b["memory"]["method"]
    torch_backend = rep["backends"]["torch"]
    assert torch_backend["status"] == "unavailable"
    assert "not built" in torch_backend["reason"] and "--target onnxruntime torch" in torch_backend["reason"]
    assert set(rep["backends"]["onnxruntime"]["speedup"]) == {"vs_eager", "vs_hf"}
    assert "vs_eager" not in rep["backends"]["eager"]["speedup"]
    assert any("clipped" in note for note in rep["settings"]["notes"])
    md = (out / "report.md").read_text()
    assert "| onnxruntime |" in md and "torch** (unavailable)" in md and rep["environment"]["device"]["name"] in md


def test_decode_profile_counts_the_operators_of_a_step(bench_report):
    out, rep = bench_report
    for name in ("eager", "hf"):
        p = rep["backends"][name]["profile"]
        assert p["steps"] == 3 and p["batch"] == 1 and "CPU" in p["method"]
        # At least one product per layer, every one a top-level aten operator, busy for some time.
        assert p["kernels_per_step"] >= 4 and p["busy_ms_per_step"] > 0
        assert p["top"] and all(t["name"].startswith("aten::") and t["calls_per_step"] > 0 for t in p["top"])
        assert sum(t["ms_per_step"] for t in p["top"]) <= p["busy_ms_per_step"] * (1 + 1e-9)
        assert p["span_ms_per_step"] is None     # the CPU has no kernel timeline
    assert "runs its own kernels" in rep["backends"]["onnxruntime"]["profile"]["reason"]
    md = (out / "report.md").read_text()
    assert "## Decode profile (batch 1)" in md and "| eager |" in md.split("Decode profile")[1]
    assert "**onnxruntime** not profiled" in md


def test_prefill_profile_counts_the_operators_of_a_prefill(bench_report):
    out, rep = bench_report
    for name in ("eager", "hf"):
        p = rep["backends"][name]["prefill_profile"]
        assert p["calls"] == 3 and p["prompt_length"] == 9 and p["batch"] == 1 and "CPU" in p["method"]
        assert p["kernels_per_call"] >= 4 and p["busy_ms_per_call"] > 0
        assert p["top"] and all(t["name"].startswith("aten::") and t["calls_per_call"] > 0 for t in p["top"])
        assert sum(t["ms_per_call"] for t in p["top"]) <= p["busy_ms_per_call"] * (1 + 1e-9)
        assert p["span_ms_per_call"] is None
    assert "runs its own kernels" in rep["backends"]["onnxruntime"]["prefill_profile"]["reason"]
    md = (out / "report.md").read_text().split("## Prefill profile (batch 1)")[1]
    assert "3 prefills of 9 tokens" in md and "| eager |" in md and "**onnxruntime** not profiled" in md


def test_a_failing_profile_costs_only_the_profile(monkeypatch):
    from bench import profile

    def broken(*_):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")
    monkeypatch.setattr(profile, "decode_profile", broken)
    assert profile.decode_profile_or_reason("eager", None, "cuda", 3, 0) == \
        {"reason": "the profiler failed (RuntimeError: CUPTI_ERROR_NOT_INITIALIZED)"}


def test_generate_prompt_has_the_length_asked_for(checkpoint):
    """Random text re-encodes to fewer tokens than it was drawn from (a GPU report once said "28-token prompt" for
    --generate-prompt 128): the prompt is drawn until it has the length asked for."""
    tokenizer = Tokenizer.load(checkpoint)
    for length in (1, 2, 7, 128, 300):
        for seed in range(3):
            text = measure.prompt_text(tokenizer, length, np.random.default_rng(seed))
            assert len(tokenizer.encode(text)) == length, (length, seed, text)


def test_plots_written(bench_report):
    out, rep = bench_report
    assert rep["plots_skipped"] is None and set(rep["plots"]) == {"decode.png", "prefill.png", "speedup.png"}
    for name in rep["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000


def test_accuracy_equals_a_direct_comparison(bench_report, checkpoint, artifact):
    """Teacher-forced figures of the onnxruntime backend, recomputed here without the bench's code."""
    import runtime
    _, rep = bench_report
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint).float().eval()
    tokens = verify.fixed_tokens(300, 32 + DRIFT_STEPS + 1)
    rows = tokens[:, :32 + ACCURACY_STEPS + 1]
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).double().numpy()[:, 31:-1]
    engine = runtime.load(artifact, backend="onnxruntime")
    state = engine.new_state(2)
    got = [engine.prefill(rows[:, :32], state)] + [engine.decode(rows[:, t], state)
                                                   for t in range(32, rows.shape[1] - 1)]
    got = np.stack(got, axis=1).astype(np.float64)
    acc = rep["backends"]["onnxruntime"]["accuracy"]
    assert acc["steps"] == ACCURACY_STEPS and acc["batch"] == 2
    assert acc["rel_error"] == pytest.approx(np.linalg.norm(got - expected) / np.linalg.norm(expected), rel=1e-6)
    assert acc["max_abs_error"] == pytest.approx(np.abs(got - expected).max(), rel=1e-6)
    assert acc["top1_agreement"] == (got.argmax(-1) == expected.argmax(-1)).mean()
    assert 0 < acc["rel_error"] < 1e-4
    assert acc["output_rounding"] is None          # a float32 artifact returns its logits unrounded

    # Drift: the float64 model (recurrent states float64 too) takes the same steps as the backend.
    model64 = Qwen3NextForCausalLM.from_pretrained(checkpoint, dtype=torch.float64)
    st = model64.new_state(1, 64)
    for i in model64.config.linear_attention_layers:
        st.layers[i] = (st.layers[i][0], st.layers[i][1].double())
    row = torch.from_numpy(tokens[:1])
    with torch.no_grad():
        model64(row[:, :32], st)
        for t in range(32, 32 + DRIFT_STEPS):
            logits64 = model64(row[:, t:t + 1], st)[0, -1].numpy()
    state = engine.new_state(1)
    engine.prefill(tokens[:1, :32], state)
    for t in range(32, 32 + DRIFT_STEPS):
        last = engine.decode(tokens[:1, t], state)[0].astype(np.float64)
    names = [s.name for s in engine.manifest.state]
    mine = np.concatenate([a.ravel() for n, a in zip(names, state.tensors) if n.startswith("recurrent_state.")])
    want = np.concatenate([st.layers[i][1].numpy().ravel() for i in model64.config.linear_attention_layers])
    drift = rep["backends"]["onnxruntime"]["drift"]
    assert drift["steps"] == DRIFT_STEPS and set(drift["logits_rel_error_by_step"]) == {"1", "2", "4", "8"}
    assert drift["logits_rel_error"] == pytest.approx(np.linalg.norm(last - logits64) / np.linalg.norm(logits64),
                                                      rel=1e-6)
    assert drift["state_rel_error"] == pytest.approx(np.linalg.norm(mine - want) / np.linalg.norm(want), rel=1e-6)
    assert rep["backends"]["hf"]["drift"]["state_rel_error"] < 1e-5   # hf exposes its cache's states too


def test_checkpoint_target_without_matplotlib(checkpoint, tmp_path, monkeypatch, capsys):
    """A checkpoint: eager and hf run, the artifact backends are listed with the export command; and without
    matplotlib the JSON and Markdown are still written, saying plots were skipped."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "ckpt-report"
    assert bench_main([str(checkpoint), "--out", str(out), *QUICK]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert schema.missing_fields(rep) == []
    assert rep["backends"]["eager"]["status"] == "ok" and rep["backends"]["hf"]["status"] == "ok"
    assert rep["target"]["kind"] == "checkpoint" and rep["target"]["manifest_sha256"] is None
    for name in ("onnxruntime", "torch"):
        assert rep["backends"][name]["status"] == "unavailable"
        assert "python -m export" in rep["backends"][name]["reason"]
    assert rep["plots"] == [] and "matplotlib is not installed" in rep["plots_skipped"]
    assert "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))
    # An earlier report is replaced without --overwrite.
    assert bench_main([str(checkpoint), "--out", str(out), "--backends", "eager", *QUICK]) == 0
    assert list(json.loads((out / "report.json").read_text())["backends"]) == ["eager"]


def test_bfloat16_accuracy_names_what_rounding_the_logits_costs(checkpoint, tmp_path):
    """A bfloat16 target: beside each backend's error, that of the float32 logits merely rounded to bfloat16."""
    out = tmp_path / "bf16"
    argv = [str(checkpoint), "--out", str(out), "--dtype", "bfloat16", "--backends", "eager", *QUICK[:-4],
            "--accuracy-steps", str(ACCURACY_STEPS), "--drift-steps", "0"]
    assert bench_main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    acc = rep["backends"]["eager"]["accuracy"]
    model = Qwen3NextForCausalLM.from_pretrained(checkpoint).float().eval()
    rows = verify.fixed_tokens(300, 32 + ACCURACY_STEPS + 1)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()[:, 31:-1]
    rounded = torch.from_numpy(expected).bfloat16().double().numpy()
    floor = acc["output_rounding"]
    assert floor["dtype"] == "bfloat16" and floor["rel_error"] > 0
    assert floor["rel_error"] == pytest.approx(np.linalg.norm(rounded - expected) / np.linalg.norm(expected), rel=1e-6)
    assert floor["top1_agreement"] == (rounded.argmax(-1) == expected.argmax(-1)).mean()
    assert acc["rel_error"] >= floor["rel_error"] / 2    # bfloat16 arithmetic on top of the rounding
    md = (out / "report.md").read_text()
    assert f"rounded to bfloat16, and nothing else: rel error {floor['rel_error']:.3g}" in md
    assert rep["plots"] == ["decode.png", "prefill.png"]      # no speedup chart: eager ran alone


def test_bad_inputs(artifact, checkpoint, tmp_path, capsys):
    out = str(tmp_path / "r")
    cases = [
        ([str(artifact), "--out", out, "--backends", "tensorflow"], "unknown backend 'tensorflow'; known: "),
        ([str(artifact), "--out", out, "--backends", "torch"],
         f"backend torch cannot run: not built into the artifact (it holds onnxruntime); add it with `python -m "
         f"export {checkpoint.resolve()} --out {artifact} --overwrite --target onnxruntime torch"),
        ([str(checkpoint), "--out", out, "--backends", "onnxruntime"],
         "runs an exported artifact, and " + str(checkpoint) + " is a checkpoint; export one with `python -m export"),
        ([str(tmp_path / "nothing"), "--out", out], "does not exist"),
        ([str(tmp_path), "--out", out], "is neither an artifact"),
        ([str(artifact), "--out", str(artifact / "inside")], "lies inside the input"),
        ([str(artifact), "--out", out, "--dtype", "bfloat16"], "--dtype applies to checkpoints only"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(artifact), "--out", out, "--device", "cuda"], "device 'cuda' needs a CUDA GPU"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases.append(([str(artifact), "--out", str(foreign)], "not an earlier bench report"))
    for argv, message in cases:
        code, err = run_cli(bench_main, argv, capsys)
        assert code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert message in err, err
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "r").exists()


def test_parser_states_defaults():
    text = " ".join(build_parser().format_help().split())
    for default in ("(default: 128 512 2048 8192)", "(default: 1 8 32)", "(default: 256)", "(default: 4096)"):
        assert default in text


def test_a_failing_backend_is_recorded_and_the_run_exits_1(checkpoint, tmp_path, monkeypatch):
    from bench import measure

    def broken(*args):
        raise RuntimeError("kernel launch failed\nsecond line")
    monkeypatch.setattr(measure, "decode", broken)
    out = tmp_path / "failed"
    assert bench_main([str(checkpoint), "--out", str(out), "--backends", "eager", *QUICK]) == 1
    eager = json.loads((out / "report.json").read_text())["backends"]["eager"]
    assert eager["status"] == "failed" and eager["reason"] == "RuntimeError: kernel launch failed"
    assert "**eager** (failed): RuntimeError: kernel launch failed" in (out / "report.md").read_text()


def test_a_stopped_run_keeps_what_it_measured(checkpoint, tmp_path, monkeypatch, capsys):
    """SIGTERM (a timeout) while the second backend runs: the report holds the first, names the second as
    interrupted with the command that measures it, and the run exits as terminated."""
    from bench import measure
    monkeypatch.setattr(measure, "decode", terminated_at_call(2, measure.decode))   # the second backend's decode
    out = tmp_path / "stopped"
    code, err = run_cli(bench_main, [str(checkpoint), "--out", str(out), "--backends", "eager", "hf", *QUICK], capsys)
    assert code == 143 and "terminated" in err
    rep = json.loads((out / "report.json").read_text())
    assert schema.missing_fields(rep) == []
    assert rep["backends"]["eager"]["status"] == "ok" and rep["backends"]["eager"]["decode"]
    hf = rep["backends"]["hf"]
    assert hf["status"] == "interrupted" and "SIGTERM" in hf["reason"] and "--backends hf`" in hf["reason"]
    assert "**hf** (interrupted)" in (out / "report.md").read_text()


def test_device_span_is_first_kernel_start_to_last_kernel_end_per_step():
    """Kernels belong to the last step range begun before them; the median span over steps, in ms."""
    from types import SimpleNamespace

    import torch

    from bench.profile import STEP, device_span_ms
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device, start, end):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))
    # Three steps (us): kernels at [110-130, 135-170], [520-600], [900-905, 950-990]; host ranges around them,
    # and a CPU operator that is not a step; the profiler's device-side copy of a step range (which may start
    # before and end after that step's kernels) is not a kernel.
    events = [event(STEP, cpu, 100, 180), event(STEP, cpu, 500, 610), event(STEP, cpu, 880, 1000),
              event("aten::mm", cpu, 120, 125), event(STEP, gpu, 105, 175), event(STEP, gpu, 505, 605),
              event("k1", gpu, 110, 130), event("k2", gpu, 135, 170), event("k3", gpu, 520, 600),
              event("k4", gpu, 900, 905), event("k5", gpu, 950, 990)]
    assert device_span_ms(events) == pytest.approx(0.080)     # spans 60, 80, 90 us: median 80
    assert device_span_ms([e for e in events if e.name != STEP]) is None


def test_a_prefill_profile_longer_than_the_target_is_clipped_and_said():
    from types import SimpleNamespace

    from bench.__main__ import build_parser, plan
    args = build_parser().parse_args(["target", "--out", "x", "--profile-prefill", "5000", "--accuracy-steps", "0",
                                      "--drift-steps", "0"])
    target = SimpleNamespace(manifest=SimpleNamespace(max_seq_len=4096, max_batch=8), checkpoint="ckpt")
    settings, notes = plan(args, target)
    assert settings["profile_prefill"] == 4096
    assert "profile prefill 5000 clipped to 4096 (the target holds 4096 tokens)" in notes
