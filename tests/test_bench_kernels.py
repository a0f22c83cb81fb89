"""`python -m bench.kernels --quick` on the CPU: the registry, the error figures, the report and its charts."""

import json
from dataclasses import replace

import pytest
import torch

from bench import kernels as registry
from bench import schema
from bench.kernels.__main__ import build_parser
from bench.kernels.__main__ import main as kernels_main
from model import cli
from model.kernels import reference
from tests.conftest import terminated_at_call

FAST = ["--quick", "--warmup", "0", "--repeats", "1"]


@pytest.fixture(scope="module")
def kernel_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "report"
    assert kernels_main(["--out", str(out), "--device", "cpu", *FAST]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_covers_every_kernel_and_implementation(kernel_report):
    out, rep = kernel_report
    assert schema.missing_fields(rep) == [] and rep["kind"] == "kernels" and rep["dtype"] == "float32"
    keys = {(k.name, k.mode) for k in registry.KERNELS}
    assert {(r["kernel"], r["mode"]) for r in rep["results"]} == keys
    for impl in registry.IMPLS:
        rows = [r for r in rep["results"] if r["impl"] == impl.name and r["kernel"] == impl.kernel]
        assert rows, impl.name
        if impl.needs("cpu"):
            assert [r["status"] for r in rows] == ["unavailable"] * len(rows) and "CUDA" in rows[0]["reason"]
        else:
            assert all(r["status"] == "ok" and r["median_ms"] > 0 and r["gb_per_s"] > 0 for r in rows)
            assert all(r["rel_error"] < 1e-5 for r in rows)
            # Every kernel but decode attention and the fused linear has a state to check.
            stateless = ("decode_attention", "fused_linear")
            assert all((r["state_rel_error"] is None) == (r["kernel"] in stateless) for r in rows)
            assert all(r["state_rel_error"] is None or r["state_rel_error"] < 1e-5 for r in rows)
    prefill = [r for r in rep["results"] if r["kernel"] == "gated_delta_rule" and r["status"] == "ok"]
    assert all(r["tflop_per_s"] > 0 and r["speedup_vs_reference"] == 1.0 for r in prefill)
    assert len(rep["plots"]) == len(keys)
    for name in rep["plots"]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 5000
    md = (out / "report.md").read_text()
    assert "## gated_delta_rule (decode)" in md and rep["environment"]["device"]["name"] in md
    # On the CPU every call is timed on its own (CUDA graphs are CUDA's), and the report says so.
    assert rep["settings"]["timing"] == "calls" and "the host's launch included" in md
    assert {r["timing"] for r in rep["results"] if r["status"] == "ok"} == {"calls"}


def test_conv_loop_is_the_reference_convolution():
    """The float64 window loop the conv implementations are checked against, on an odd quick shape."""
    conv = next(k for k in registry.KERNELS if k.key == "causal_conv1d/prefill")
    x, w, state = conv.make_inputs(conv.quick[1], torch.float64, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(conv.loop64(x, w, state), reference.causal_conv1d(x, w, state))


def test_an_added_implementation_is_one_entry(tmp_path, monkeypatch):
    """A registered implementation is measured beside the reference; a wrong one shows its error."""
    def off_by_one_percent(*args):
        o, s = reference.gated_delta_rule_chunked(*args)
        return o * 1.01, s
    monkeypatch.setattr(registry, "IMPLS", [*registry.IMPLS,
                                            registry.Impl("gated_delta_rule", "scaled", off_by_one_percent)])
    monkeypatch.setattr(registry, "KERNELS", [replace(k, quick=k.quick[:1]) for k in registry.KERNELS
                                              if k.name == "gated_delta_rule"])
    out = tmp_path / "r"
    assert kernels_main(["--out", str(out), "--device", "cpu", "--impls", "reference", "scaled", *FAST]) == 0
    rows = json.loads((out / "report.json").read_text())["results"]
    scaled = [r for r in rows if r["impl"] == "scaled"]
    assert len(scaled) == 2 and all(r["rel_error"] == pytest.approx(0.01, rel=1e-3) for r in scaled)
    assert all(r["speedup_vs_reference"] > 0 for r in scaled)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: kernels_main(argv))
    return e.value.code, capsys.readouterr().err


def test_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """SIGTERM (a timeout) at the third shape: the report holds the two measured and says where the run stopped."""
    import bench.kernels.__main__ as entry
    monkeypatch.setattr(entry, "measure", terminated_at_call(3, entry.measure))
    out = tmp_path / "stopped"
    code, err = run_cli(["--out", str(out), "--device", "cpu", "--impls", "reference", *FAST], capsys)
    assert code == 143 and "terminated" in err
    rep = json.loads((out / "report.json").read_text())
    assert schema.missing_fields(rep) == [] and len(rep["results"]) == 2
    assert all(r["status"] == "ok" for r in rep["results"])
    assert "stopped (SIGTERM) after 2 of" in rep["settings"]["notes"][0]
    assert rep["settings"]["notes"][0] in (out / "report.md").read_text()


def test_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "k")
    cases = [(["--out", out, "--kernels", "softmax"],
              "unknown kernel 'softmax'; known: gated_delta_rule, causal_conv1d, "
              "gated_deltanet_decode"),
             (["--out", out, "--impls", "cuda-graph"], "unknown implementation 'cuda-graph'"),
             (["--out", out, "--device", "cpu", "--impls", "triton"],
              "implementation triton of gated_delta_rule cannot "
              "run: the Triton kernels run on CUDA"),
             (["--out", out, "--device", "cpu", "--impls", "fla"], "implementation fla of gated_delta_rule cannot run: "
              "CUDA kernels"),
             (["--out", out, "--device", "cpu", "--timing", "graph"], "--timing graph replays CUDA graphs; use "
              "--device cuda, or --timing calls")]
    if not torch.cuda.is_available():
        cases.append((["--out", out, "--device", "cuda"], "device 'cuda' needs a CUDA GPU"))
    for argv, message in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "k").exists()
    assert "(default: 20)" in " ".join(build_parser().format_help().split())
