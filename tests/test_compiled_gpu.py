"""The compiled engine and ONNX Runtime's CUDA graphs on a GPU: parity with the float32 eager model, CUDA graphs
that replay exactly what the compiled code computes, padding rows, snapshots, device sampling, and a warm start
from the artifact's compile cache.

    python -m pytest -q -s tests/test_compiled_gpu.py      # -s prints the figures
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import runtime
from export import verify
from export.__main__ import main as export_main
from model import Qwen3NextForCausalLM
from model.sampling import Sampler, SamplingConfig
from model.tokenizer import Tokenizer
from tests.conftest import eager_greedy, randomize, small_config
from tests.test_gpu import _ort_cuda

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (compiled CUDA engine, "
                                                                    "CUDA graphs, device sampling)")]
CONFIG = dict(vocab_size=320, linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=256)
SHAPES = ["--max-batch", "4", "--decode-buckets", "1", "4", "--prefill-chunks", "4", "16", "--max-seq-len", "128"]


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("gpu-compiled") / "ckpt"
    randomize(Qwen3NextForCausalLM(small_config(**CONFIG)), seed=5, scale=0.05).save_pretrained(ckpt)
    Tokenizer.train(["def f(x):\n    return x * 2\n", "for i in range(10):\n    print(i)\n"] * 30, 300).save(ckpt)
    return ckpt


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def compiled(request, checkpoint, tmp_path_factory):
    """(artifact, dtype, engine with CUDA graphs, engine without)."""
    out = tmp_path_factory.mktemp("art") / request.param
    assert export_main([str(checkpoint), "--out", str(out), "--target", "compiled", "--device", "cuda",
                        "--dtype", request.param, *SHAPES]) == 0
    return (out, request.param, runtime.load(out, backend="compiled", device="cuda"),
            runtime.load(out, backend="compiled", device="cuda", cuda_graphs=False))


def test_matches_the_float32_eager_model(checkpoint, compiled):
    out, dtype, engine, _ = compiled
    tokens = verify.fixed_tokens(CONFIG["vocab_size"], 128)
    expected = verify.reference_logits(Qwen3NextForCausalLM.from_pretrained(checkpoint), tokens)[:, 31:-1]
    figures = verify.compare(verify.run_engine_teacher_forced(engine, tokens, 32), expected)
    print(f"\ncompiled cuda {dtype}, prefill 32 + 95 decode steps with CUDA graphs: {figures}")
    if dtype == "float32":
        assert figures["rel_error"] < 1e-4 and figures["top1_agreement"] == 1.0
    else:
        assert figures["rel_error"] < 5e-2 and figures["top1_agreement"] > 0.95


def test_cuda_graphs_replay_the_compiled_step(compiled):
    _, dtype, graphs, plain = compiled
    ids = np.random.default_rng(1).integers(0, CONFIG["vocab_size"], size=(3, 60))
    a, b = graphs.new_state(3), plain.new_state(3)             # bucket 4: a padding row
    got = [[e.prefill(ids[:, :21], s)] for e, s in ((graphs, a), (plain, b))]
    for t in range(21, 60):
        # Host ids in and host logits out (Engine.decode's graph), alternating with device logits (the graph
        # device sampling replays) on the same state.
        if t % 3:
            got[0].append(graphs.decode(ids[:, t], a))
        else:
            got[0].append(graphs.backend.step_on_device(ids[:, t:t + 1], a.tensors, np.arange(3), 3).cpu().numpy())
            a.lengths += 1
        got[1].append(plain.decode(ids[:, t], b))
    diff = np.abs(np.stack(got[0]) - np.stack(got[1])).max()
    print(f"\n{dtype}: CUDA graph replay vs direct calls of the compiled step, max abs difference {diff:.2e}")
    assert diff <= 1e-5


def test_greedy_tokens_identical_to_eager_for_32_steps(checkpoint, compiled):
    _, dtype, engine, _ = compiled
    if dtype != "float32":
        pytest.skip("greedy identity is checked in float32; bfloat16 rounds away from the float32 reference")
    model, tok = Qwen3NextForCausalLM.from_pretrained(checkpoint).eval(), Tokenizer.load(checkpoint)
    expected = tok.decode(eager_greedy(model, tok.encode("def f(x):"), 32, 128))
    assert "".join(engine.generate("def f(x):", max_new_tokens=32, temperature=0.0, stop=[])) == expected


def test_padding_rows_ragged_prefill_and_snapshots(compiled):
    _, dtype, engine, _ = compiled
    rows = [np.arange(5, 25), np.arange(40, 47), np.arange(3, 16)]
    state = engine.new_state(3)
    ragged = engine.prefill(rows, state)
    poisoned = state.clone()
    slot = poisoned.tensors.slot
    for t in slot.tensors[:-1]:
        t[3] = (torch.randn_like(t[3], dtype=torch.float32) * 100).to(t.dtype)
    slot.ids[3] = 7
    snapshot = state.clone()
    first = [engine.decode([t, t + 1, t + 2], state) for t in (1, 4, 7)]
    for t, expected in zip((1, 4, 7), first):
        np.testing.assert_array_equal(engine.decode([t, t + 1, t + 2], poisoned), expected)
    state.restore(snapshot)                                   # a new slot: captured again, same results
    for t, expected in zip((1, 4, 7), first):
        np.testing.assert_array_equal(engine.decode([t, t + 1, t + 2], state), expected)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for i, r in enumerate(rows):
        single = engine.new_state(1)
        assert rel(engine.prefill([r], single), ragged[i:i + 1]) < tol
        steps = [engine.decode([t + i], single) for t in (1, 4, 7)]
        assert rel(np.concatenate(steps), np.concatenate([f[i:i + 1] for f in first])) < tol


def test_device_sampling_on_cuda(compiled):
    _, _, engine, _ = compiled
    logits = torch.randn(4, CONFIG["vocab_size"], device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    history = [[1, 2, 3], [4], [], [9, 9]]
    greedy = SamplingConfig(temperature=0.0, repetition_penalty=1.3)
    from runtime.device_sampling import DeviceSampler
    np.testing.assert_array_equal(DeviceSampler(greedy, "cuda")(logits, history).cpu().numpy(),
                                  Sampler(greedy)(logits.cpu().numpy(), history))
    sampled = SamplingConfig(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2, seed=3)
    draws = [DeviceSampler(sampled, "cuda")(logits, history) for _ in range(2)]
    assert torch.equal(*draws) and draws[0].device.type == "cuda"
    options = dict(max_new_tokens=24, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, stop=[], seed=5)
    assert "".join(engine.generate("def ", **options)) == "".join(engine.generate("def ", **options))


def test_device_sampling_graphs_select_what_plain_calls_select():
    """The sampler's CUDA graph, captured at a logits buffer's second use, picks the same ids as plain calls, draw for
    draw (the random variates are drawn outside the graph from the same seeded generator)."""
    from runtime.device_sampling import DeviceSampler
    g = torch.Generator("cuda").manual_seed(1)
    buffer = torch.empty(3, CONFIG["vocab_size"], device="cuda")
    for config in (SamplingConfig(temperature=0.0, repetition_penalty=1.3),
                   SamplingConfig(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2, seed=3),
                   SamplingConfig(temperature=1.1, top_p=0.8, seed=4)):
        plain, graphed = DeviceSampler(config, "cuda"), DeviceSampler(config, "cuda", graphs=True)
        history = [[1, 2], [3], []]
        for _ in range(6):
            buffer.copy_(torch.randn(buffer.shape, device="cuda", generator=g) * 3)
            want = plain(buffer, history)
            got = graphed(buffer, history).clone()
            assert torch.equal(got, want), config
            for row, token in zip(history, want.tolist()):
                row.append(token)
        assert sum(entry != () for entry in graphed.captured.values()) == 1


def test_programmatic_dependent_launch(checkpoint, tmp_path):
    """--pdl: Inductor's kernels wait on their predecessors in the kernel itself; the same results as eager, with and
    without CUDA graphs."""
    from runtime.compiled_backend import pdl_support
    if pdl_support("cuda"):
        pytest.skip(pdl_support("cuda"))
    out = tmp_path / "pdl"
    assert export_main([str(checkpoint), "--out", str(out), "--target", "compiled", "--device", "cuda", "--pdl",
                        *SHAPES]) == 0
    assert json.loads((out / "manifest.json").read_text())["targets"]["compiled"]["pdl"] is True
    tokens = verify.fixed_tokens(CONFIG["vocab_size"], 128)
    expected = verify.reference_logits(Qwen3NextForCausalLM.from_pretrained(checkpoint), tokens)[:, 31:-1]
    for graphs in (True, False):
        engine = runtime.load(out, backend="compiled", device="cuda", cuda_graphs=graphs)
        figures = verify.compare(verify.run_engine_teacher_forced(engine, tokens, 32), expected)
        print(f"\ncompiled cuda float32 --pdl, CUDA graphs {graphs}: {figures}")
        assert figures["rel_error"] < 1e-4 and figures["top1_agreement"] == 1.0


def test_pdl_launches_the_project_kernels_dependent():
    """With --pdl's options Inductor launches the project's kernels with programmatic dependent launch too (the
    definitions it writes are amended: runtime/compiled_backend.py), without them it does not; same results."""
    from torch._inductor.utils import run_and_get_code
    from runtime.compiled_backend import compile_options, pdl_support
    if pdl_support("cuda"):
        pytest.skip(pdl_support("cuda"))
    torch.manual_seed(0)
    x, weight, norm = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in ((1, 300), (520, 300),
                                                                                              (300,)))

    def step(x):   # an Inductor kernel on either side of the project's
        return torch.ops.nextdeploy.fused_linear(x.exp(), weight, None, norm, None, None, 1e-6, False, 4).relu()

    results = {}
    for pdl in (False, True):
        torch._dynamo.reset()
        with torch._inductor.config.patch(force_disable_caches=True):
            compiled = torch.compile(step, fullgraph=True, options=compile_options(pdl=pdl))
            results[pdl], codes = run_and_get_code(compiled, x)
        code = "\n".join(codes)
        assert "fused_linear_kernel" in code
        assert code.count("triton_meta={'launch_pdl': True") == int(pdl)
    assert torch.equal(results[True], results[False])


def test_warm_start_from_the_artifact_cache(compiled, tmp_path):
    """A fresh process with an empty Inductor cache loads the artifact from its recorded cache: no compile misses."""
    out = compiled[0]
    code = ("import json, sys, runtime; from torch._dynamo.utils import counters; "
            "e = runtime.load(sys.argv[1], backend='compiled', device='cuda'); "
            "print(json.dumps({'seconds': e.backend.load_seconds, 'inductor': dict(counters['inductor']), "
            "'aot_autograd': dict(counters['aot_autograd'])}))")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "TRITON_CACHE_DIR": str(tmp_path / "t")}
    run = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, check=True)
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\n{compiled[1]} warm load: {figures}")
    assert figures["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert figures["aot_autograd"].get("autograd_cache_miss", 0) == 0


@pytest.mark.skipif(not (CUDA and _ort_cuda()), reason="needs a CUDA device and onnxruntime-gpu")
@pytest.mark.parametrize("dtype,op", [("float32", "LinearAttention"), ("float16", "GatedDeltaNet")])
def test_onnxruntime_cuda_graphs_match_the_plain_path(checkpoint, tmp_path, dtype, op):
    out = tmp_path / "ort"
    assert export_main([str(checkpoint), "--out", str(out), "--device", "cuda", "--dtype", dtype, "--target",
                        "onnxruntime", "--onnx-gated-delta-op", op, "--max-seq-len", "128"]) == 0
    graphs = runtime.load(out, device="cuda")
    plain = runtime.load(out, device="cuda", cuda_graphs=False)
    ids = np.random.default_rng(2).integers(0, CONFIG["vocab_size"], size=(2, 90))
    a, b = graphs.new_state(2), plain.new_state(2)
    got = [[e.prefill(ids[:, :16], s)] for e, s in ((graphs, a), (plain, b))]
    for t in range(16, 60):                                   # past ONNX Runtime's warm-up runs and the capture
        got[0].append(graphs.decode(ids[:, t], a))
        got[1].append(plain.decode(ids[:, t], b))
    assert graphs.backend.cuda_graphs and list(graphs.backend.graph_sessions) == [2], \
        "ONNX Runtime refused CUDA graphs (see the note above)"
    snapshot = a.clone()
    after = [graphs.decode(ids[:, t], a) for t in range(60, 70)]
    a.restore(snapshot)
    again = [graphs.decode(ids[:, t], a) for t in range(60, 70)]
    diff = np.abs(np.stack(got[0]) - np.stack(got[1])).max()
    print(f"\nonnxruntime cuda {dtype} {op}: CUDA graphs vs plain, max abs difference {diff:.2e}")
    assert diff <= 1e-4 * max(1.0, np.abs(np.stack(got[1])).max())
    np.testing.assert_allclose(np.stack(again), np.stack(after), rtol=1e-5, atol=1e-5)
    # Ragged prefill goes through the host into the same buffers; the captured graphs must still see them.
    c, d = graphs.new_state(2), plain.new_state(2)
    rows = [ids[0, :11], ids[1, :5]]
    graphs.prefill(rows, c)
    plain.prefill(rows, d)
    for t in range(11, 20):
        np.testing.assert_allclose(graphs.decode(ids[:, t], c), plain.decode(ids[:, t], d), rtol=1e-4, atol=1e-4)
