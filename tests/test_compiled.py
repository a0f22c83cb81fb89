"""--target compiled on CPU: the Inductor-compiled engine (AOTInductor packages, and the exported programs compiled
at load) must give the eager model's answers, with padding rows, chunked prefill and state snapshots; bad input
is named. One artifact of a two-layer model serves every test: each compiled shape costs seconds on 2 cores."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import runtime
from export.__main__ import main as export_main
from model import CapacityError, Qwen3NextForCausalLM
from model.fusion import FUSED_LINEAR_MAX_ROWS
from model.tokenizer import Tokenizer
from runtime import ArtifactError
from runtime.compiled_backend import chunk_lengths, compile_options, default_decode_buckets, default_prefill_chunks
from runtime.slots import SlotPool
from tests.conftest import eager_greedy, randomize, small_config

pytestmark = pytest.mark.slow
FORMS = ["aoti", "exported"]
CONFIG = dict(vocab_size=320, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
              mlp_only_layers=[1], max_position_embeddings=512)
EXPORT = ["--target", "compiled", "--max-batch", "4", "--decode-buckets", "1", "4", "--prefill-chunks", "4",
          "--max-seq-len", "64", "--verify-tokens", "12"]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A random two-layer model (DeltaNet + MoE, attention + MLP) with a tokenizer, exported for CPU."""
    root = tmp_path_factory.mktemp("compiled")
    ckpt, out = root / "ckpt", root / "art"
    randomize(Qwen3NextForCausalLM(small_config(**CONFIG)), seed=3).save_pretrained(ckpt)
    text = ["def f(x):\n    return x * 2\n", "class A:\n    pass\n", "for i in range(10):\n    print(i)\n"] * 20
    Tokenizer.train(text, 300).save(ckpt)
    assert export_main([str(ckpt), "--out", str(out), *EXPORT]) == 0
    return ckpt, out


ENGINES = {}


@pytest.fixture(params=FORMS)
def engine(request, artifact):
    """One engine per form for the whole module: loading the exported programs compiles every shape."""
    if request.param not in ENGINES:
        ENGINES[request.param] = runtime.load(artifact[1], backend="compiled", form=request.param)
    return ENGINES[request.param]


def eager(ckpt):
    return Qwen3NextForCausalLM.from_pretrained(ckpt).eval()


def test_shapes_cover_every_length():
    assert default_decode_buckets(32) == [1, 2, 4, 8, 16, 32] and default_decode_buckets(6) == [1, 2, 4, 6]
    assert default_decode_buckets(1) == [1] and default_prefill_chunks(40) == [2, 4, 8, 16, 32]
    assert chunk_lengths(13, [2, 4, 8]) == [8, 4, 1] and chunk_lengths(20, [16]) == [16, 1, 1, 1, 1]
    for n in range(1, 70):
        parts = chunk_lengths(n, default_prefill_chunks(64))
        assert sum(parts) == n and len(parts) == len(set(parts))   # power-of-two chunks: one call per bit


def test_compile_options(caplog):
    unpadded = {"comprehensive_padding": False}   # the project's kernels are traced at unpadded strides
    assert compile_options() == unpadded
    assert compile_options(autotune=True) == {**torch._inductor.list_mode_options("max-autotune-no-cudagraphs"),
                                              **unpadded}
    if not torch.cuda.is_available():     # an artifact built with --pdl, compiled afresh where PDL is unavailable
        with caplog.at_level(logging.WARNING, "next_deploy.runtime"):
            assert compile_options(pdl=True) == unpadded
        assert "compiling without programmatic dependent launch" in caplog.text


def test_manifest_describes_the_compiled_target(artifact):
    _, out = artifact
    m = json.loads((out / "manifest.json").read_text())
    c = m["targets"]["compiled"]
    assert c["forms"] == ["exported", "aoti"] and c["decode_buckets"] == [1, 4] and c["prefill_chunks"] == [4]
    assert c["autotune"] is False and c["pdl"] is False and c["fused_linear_rows"] == FUSED_LINEAR_MAX_ROWS
    assert set(c["files"]) == {"prefill", "decode", "aoti:decode-b1", "aoti:decode-b4", "aoti:prefill-t4"}
    assert c["compiled_with"]["torch"] == torch.__version__ and c["compile_seconds"] > 0
    assert m["parity"]["compiled"]["rel_error"] < 1e-4 and m["parity"]["compiled"]["top1_agreement"] == 1.0
    # The programs compute projections over one input as one product, the norms folded in (model/fusion.py).
    decode = torch.export.load(str(out / c["files"]["decode"]))
    weights = decode.state_dict
    assert {"model.model.layers.0.mixer.fused.weight", "model.model.layers.1.mixer.fused.weight",
            "model.model.layers.1.mlp.gate_up.weight", "model.model.layers.1.mixer.fused.norm.weight",
            "model.lm_head.norm.weight"} <= weights.keys()
    assert "nextdeploy::fused_linear" in c["custom_ops"]
    # Per layer the mixer's input and output products and the MLP's two (layer 0's MoE: its shared expert's), and
    # the LM head, which alone returns float32; each carries --fused-linear-rows. One attention layer's inputs.
    calls = [n for n in decode.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    products = [n for n in calls if n.target.name() == "nextdeploy::fused_linear"]
    assert len(products) == 9 and {n.args[-1] for n in products} == {FUSED_LINEAR_MAX_ROWS}
    assert [n.args[-2] for n in products] == [False] * 8 + [True]
    assert sum(n.target.name() == "nextdeploy::norm_rope_cache" for n in calls) == 1
    assert not any(k.endswith(("in_proj_ba.weight", "k_proj.weight", "up_proj.weight")) for k in weights)
    # The prefill program (any prompt length) attends through the cache kernel, which reads only the slots in use,
    # not through a masked attention over the whole capacity.
    prefill = torch.export.load(str(out / c["files"]["prefill"]))
    names = [n.target.name() for n in prefill.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert "nextdeploy::decode_attention" in names and not any("scaled_dot_product" in n for n in names)


def test_compiled_shapes_share_one_copy_of_the_weights(engine):
    """Every compiled shape runs on the same weight tensors: prefill and decode programs each hold a copy on disk,
    shared once loaded."""
    backend = engine.backend
    if backend.form == "aoti":
        pytest.skip("AOTInductor packages hold no weights: every runner is given the one decode program's")
    modules = [getattr(step, "_orig_mod", step) for step in backend.steps.values()]
    pointers = [{n: p.data_ptr() for n, p in m.named_parameters()} for m in modules]
    assert len(pointers[0]) > 10 and all(p == pointers[0] for p in pointers)


def test_prefill_decode_handoff_matches_eager(artifact, engine):
    ckpt, _ = artifact
    ids = np.random.default_rng(0).integers(0, 320, size=(2, 40))
    with torch.no_grad():
        expected = eager(ckpt)(torch.as_tensor(ids)).numpy()
    state = engine.new_state(2)
    got = [engine.prefill(ids[:, :13], state), engine.prefill(ids[:, 13:30], state)]   # chunks 4+4+4+1, 4*4+1
    got += [engine.decode(ids[:, t], state) for t in range(30, 40)]
    assert rel(np.stack(got, 1), expected[:, [12, 29, *range(30, 40)]]) < 1e-4
    assert state.lengths.tolist() == [40, 40]


def test_greedy_tokens_identical_to_eager_for_32_steps(artifact, engine):
    ckpt, _ = artifact
    model, tok = eager(ckpt), Tokenizer.load(ckpt)
    expected = tok.decode(eager_greedy(model, tok.encode("def f(x):"), 32, 64))
    assert "".join(engine.generate("def f(x):", max_new_tokens=32, temperature=0.0, stop=[])) == expected


def test_generate_ids_streams_the_greedy_tokens_and_stops_at_a_stop_id(artifact, engine):
    """Token-level generation (the device sampler's path) for applications without this artifact's tokenizer."""
    ckpt, _ = artifact
    prompt = [5, 17, 3, 250]
    expected = eager_greedy(eager(ckpt), prompt, 24, 64)
    assert list(engine.generate_ids(prompt, max_new_tokens=24)) == expected
    cut = expected.index(expected[10])   # the first occurrence of the 11th token: stop there, not yielded
    assert list(engine.generate_ids(prompt, max_new_tokens=24, stop=[expected[10]])) == expected[:cut]


def test_generation_running_ahead_samples_what_the_plain_loop_samples(engine):
    """The engine queues step n + 1 before reading token n; the tokens must be those of model.generate's plain loop
    over the same logits with an equally seeded device sampler (sampling with every option on)."""
    from model.generate import generate_ids
    from model.sampling import SamplingConfig
    from runtime.device_sampling import DeviceSampler
    options = dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7)
    prompt = [11, 4, 200, 9, 31]
    ahead = list(engine.generate_ids(prompt, max_new_tokens=30, **options))
    state = engine.new_state(1)
    plain = list(generate_ids(lambda ids: engine._next_logits(ids, state), prompt, 30,
                              DeviceSampler(SamplingConfig(**options), "cpu"), set()))
    assert ahead == plain and len(set(ahead)) > 3
    stop = ahead[12]
    assert list(engine.generate_ids(prompt, max_new_tokens=30, stop=[stop], **options)) == ahead[:ahead.index(stop)]


def test_ragged_prefill_and_padding_rows_change_nothing(engine):
    rows = [np.arange(5, 14), np.arange(40, 44), np.arange(3, 10)]
    state = engine.new_state(3)                  # bucket 4: one padding row
    ragged = engine.prefill(rows, state)
    assert state.lengths.tolist() == [9, 4, 7]
    poisoned = state.clone()
    slot = poisoned.tensors.slot
    for t in slot.tensors[:-1]:
        t[3] = torch.randn(t[3].shape, generator=torch.Generator().manual_seed(0)).to(t.dtype) * 100
    slot.ids[3] = 319
    for step in ([1, 2, 3], [4, 5, 6]):
        a, b = engine.decode(step, state), engine.decode(step, poisoned)
        np.testing.assert_array_equal(a, b)      # bit for bit: padding never reaches a real row
    for i, r in enumerate(rows):
        single = engine.new_state(1)             # bucket 1: no padding at all
        assert rel(engine.prefill([r], single), ragged[i:i + 1]) < 1e-5
        engine.decode([i + 1], single)
        assert rel(engine.decode([i + 4], single), b[i:i + 1]) < 1e-5


def test_cuda_graph_bookkeeping_with_a_stand_in_for_graphs(artifact, monkeypatch):
    """The CUDA path's bookkeeping, run on the CPU with a stand-in for CUDA graphs that reruns the recorded step at
    each replay: decode over a slot's fixed buffers, and prefill through the one-row stage (a row's state copied in,
    each chunk's ids into its fixed buffer, the state copied back, the logits cloned out of the graph's output,
    which the next row's replay overwrites), and decode between host buffers (the ids copied in and the logits out
    inside the graph). Ragged rows, then decode steps: the direct path's logits."""
    from runtime.compiled_backend import CompiledBackend

    class Replay:
        def __init__(self, step, args, out):
            self.step, self.args, self.out = step, args, out

        def replay(self):
            self.out.copy_(self.step(*self.args))

    def record(self, step, *args, pool=None):
        out = step(*[a.clone() for a in args])   # a capture runs nothing: the buffers stay as they are
        return Replay(step, args, out), out

    monkeypatch.setattr(CompiledBackend, "_record", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    graphs, direct = (runtime.load(artifact[1], backend="compiled", form="aoti") for _ in range(2))
    graphs.backend.graphs = True
    rows = [np.arange(5, 14), np.arange(40, 44), np.arange(3, 10)]    # chunks 4+4+1, 4, 4+1+1+1
    states = graphs.new_state(3), direct.new_state(3)
    # (copies: on the CPU the logits a decode graph returns are views of its output buffer, which CUDA copies out)
    got = [[e.prefill(rows, s)] + [e.decode([t, t + 1, t + 2], s).copy() for t in (1, 4, 7)]
           for e, s in zip((graphs, direct), states)]
    np.testing.assert_allclose(np.stack(got[0]), np.stack(got[1]), rtol=1e-6, atol=1e-6)
    assert sorted(graphs.backend.stage.chunks) == [1, 4] and states[0].tensors.slot.graph is not None
    same_length = np.arange(20, 47).reshape(3, 9)       # one call: every row's prefill before the rows are joined
    np.testing.assert_allclose(graphs.prefill(same_length, graphs.new_state(3)),
                               direct.prefill(same_length, direct.new_state(3)), rtol=1e-6, atol=1e-6)


def test_slot_pool_keeps_the_free_slots_of_one_shape():
    made = []
    pool = SlotPool(lambda bucket: made.append(bucket) or [bucket])
    handle, reused = pool.take(1)
    del handle                                   # the state is gone: its slot is free for the next batch-1 state
    handle, reused = pool.take(1)
    assert reused and made == [1]
    del handle
    big, reused = pool.take(8)                   # a new slot lets go of the free slots of other shapes
    assert not reused and not pool.free[1] and made == [1, 8]
    del big
    onnx_like = SlotPool(lambda bucket: [bucket], release_other_shapes=False)
    handle, _ = onnx_like.take(1)
    del handle
    onnx_like.take(8)
    assert len(onnx_like.free[1]) == 1


def test_clone_and_restore_give_identical_continuations(engine):
    state = engine.new_state(2)
    engine.prefill([[4, 8, 15, 16, 23, 42], [1, 2, 3, 4, 5, 6]], state)
    snapshot = state.clone()
    first = [engine.decode([t, t + 1], state) for t in (1, 2, 3)]
    state.restore(snapshot)
    again = [engine.decode([t, t + 1], state) for t in (1, 2, 3)]
    fork = snapshot.clone()
    forked = [engine.decode([t, t + 1], fork) for t in (1, 2, 3)]
    for a, b, c in zip(first, again, forked):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert snapshot.lengths.tolist() == [6, 6] and state.lengths.tolist() == [9, 9]


def test_seeded_generation_on_the_device_repeats(artifact):
    engine = ENGINES.get("aoti") or runtime.load(artifact[1], backend="compiled")
    options = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, stop=[])
    a, b = ("".join(engine.generate("def ", seed=5, **options)) for _ in range(2))
    assert a == b and len(a) > 0
    assert a != "".join(engine.generate("def ", seed=6, **options))


def test_runtime_cli_runs_the_compiled_backend(artifact, capsys):
    from runtime.__main__ import main as runtime_main
    assert runtime_main([str(artifact[1]), "--backend", "compiled", "--prompt", "def f", "--max-new-tokens", "4",
                         "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def f")


def test_capacity_errors_change_nothing(engine):
    with pytest.raises(CapacityError, match="--max-batch"):
        engine.new_state(5)
    state = engine.new_state(2)
    with pytest.raises(CapacityError, match="--max-seq-len"):
        engine.prefill(np.ones((2, 65), dtype=np.int64), state)
    assert state.lengths.tolist() == [0, 0]


def test_artifact_for_another_machine_or_device(artifact, tmp_path, caplog):
    _, out = artifact
    with pytest.raises(ArtifactError, match="compiled for cpu; load it with device='cpu'"):
        runtime.load(out, backend="compiled", device="cuda")
    with pytest.raises(ArtifactError, match="unknown form"):
        runtime.load(out, backend="compiled", form="tensorrt")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    m = json.loads((other / "manifest.json").read_text())
    m["targets"]["compiled"]["compiled_with"] = {"torch": "2.11.0+cu130", "target": "CPU (avx2)"}
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"torch 2\.11\.0\+cu130 for CPU \(avx2\).*this machine has torch"):
        runtime.load(other, backend="compiled", form="aoti")
    with caplog.at_level(logging.WARNING, logger="next_deploy.runtime"):
        engine = runtime.load(other, backend="compiled")      # the packages do not apply: compiled afresh
    assert engine.backend.form == "exported" and "compiling 3 graphs" in caplog.text
    reference = ENGINES.get("aoti") or runtime.load(out, backend="compiled")
    ids = [[3, 1, 4, 1, 5]]
    np.testing.assert_allclose(engine.prefill(ids, engine.new_state(1)), reference.prefill(ids, reference.new_state(1)),
                               rtol=1e-5, atol=1e-5)


def test_no_cpp_compiler(artifact, tmp_path, monkeypatch, capsys):
    ckpt, out = artifact
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-compiler",))
    assert export_main([str(ckpt), "--out", str(tmp_path / "x"), *EXPORT]) == 2
    assert "C++ compiler" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ArtifactError, match=r"C\+\+ compiler"):
        runtime.load(out, backend="compiled", form="exported")
    assert runtime.load(out, backend="compiled").backend.form == "aoti"   # the packages need no compiler


def test_export_option_errors(artifact, tmp_path, capsys):
    ckpt, _ = artifact
    out = str(tmp_path / "x")
    assert export_main([str(ckpt), "--out", out, "--target", "compiled", "--max-batch", "4",
                        "--decode-buckets", "8"]) == 2
    assert "--decode-buckets 8 exceeds --max-batch 4" in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", out, "--target", "compiled", "--max-seq-len", "64",
                        "--prefill-chunks", "128"]) == 2
    assert "--prefill-chunks 128 exceeds --max-seq-len 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(ckpt), "--out", out, "--target", "compiled", "--prefill-chunks", "1"])
    assert "--prefill-chunks" in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", out, "--target", "compiled", "--autotune"]) == 2
    assert "--autotune applies to the compiled target on CUDA" in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", out, "--target", "torch", "--autotune"]) == 2
    assert "--autotune applies to the compiled target on CUDA" in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", out, "--target", "compiled", "--pdl"]) == 2
    assert "--pdl applies to the compiled target on CUDA" in capsys.readouterr().err
    assert export_main([str(ckpt), "--out", out, "--target", "torch", "--fused-linear-rows", "1"]) == 2
    assert "--fused-linear-rows applies to the compiled target" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main([str(ckpt), "--out", out, "--target", "compiled", "--fused-linear-rows", "-1"])
    assert "--fused-linear-rows" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
