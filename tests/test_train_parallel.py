"""Training at scale, checked on CPU: two torchrun processes (gloo) train like one process at the same global
batch, resume exactly with the same number and refuse another; the MoE load-balancing loss; the compiled step;
out-of-memory and world-size errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import ConfigError, Qwen3NextForCausalLM
from model.layers import Router
from tests.test_train import MICRO, config, corpus, losses  # noqa: F401  (corpus is a fixture)
from train.__main__ import main as train_main
from train.moe import load_balancing_loss
from train.trainer import Trainer, TrainingOutOfMemory

ROOT = Path(__file__).resolve().parents[1]
MOE = dict(MICRO, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
RUN = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup-steps", "2",
       "--save-every", "3", "--eval-every", "3", "--sample-tokens", "0", "--device", "cpu"]


def torchrun_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "train",
            *args]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def cli_args(tmp_path, corpus, out, overrides):
    return ["--data", str(corpus), "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"),
            "--model-config", json.dumps(overrides), *RUN]


@pytest.mark.slow
def test_two_processes_with_ddp_match_one_process(tmp_path, corpus):
    assert train_main(cli_args(tmp_path, corpus, "one", MICRO)) == 0
    done = torchrun(*cli_args(tmp_path, corpus, "two", MICRO), "--parallel", "ddp")
    assert done.stdout.count("saved ") == 1                      # rank 0 speaks for both
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(1, 7))           # one log, written once
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["val_loss"] for r in two if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in one if "val_loss" in r], rel=1e-5)
    a, b = (Qwen3NextForCausalLM.from_pretrained(tmp_path / d) for d in ("one", "two"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp_resumes_exactly_with_the_same_processes_and_refuses_others(tmp_path, corpus, capsys):
    """A sharded MoE run (load-balancing loss included): its optimizer state round-trips through the full
    checkpoint, so resuming from step 3 repeats steps 4-6 exactly; one process may not resume it."""
    run = tmp_path / "fsdp"
    torchrun(*cli_args(tmp_path, corpus, "fsdp", MOE), "--parallel", "fsdp")
    straight = losses(run)
    assert all(r["aux_loss"] > 0 for r in straight)
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in straight[:3]))
    torchrun("--out", str(run), "--resume")
    untimed = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in straight]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in losses(run)] == untimed

    assert train_main(["--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by a run of 2 process(es) and this run has 1" in err
    assert "torchrun --nproc-per-node 2 -m train" in err and err.count("\n") == 1


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_once_at_a_step_all_processes_agree_on(tmp_path, corpus):
    """Ctrl-C reaches torchrun, which passes it to each process at its own moment; they stop together."""
    args = cli_args(tmp_path, corpus, "stopped", MICRO)
    args[args.index("--steps") + 1] = args[args.index("--save-every") + 1] = "100000"
    run = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun_command(*args), cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "log.jsonl").is_file() and len(losses(run)) >= 4) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    steps = len(losses(run))
    assert out.count("saved ") == 1 and f"interrupted at step {steps}; continue with: torchrun" in out
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f"step-{steps:07d}"]


def test_world_size_must_divide_the_global_batch(tmp_path, corpus, monkeypatch):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="--batch-size 3 sequences cannot be shared evenly by 2 processes.*such as 4"):
        Trainer(config(tmp_path, corpus, batch_size=3))


def direct_load_balancing_loss(logits: list[torch.Tensor], num_experts: int, top_k: int) -> float:
    """Switch Transformer's loss written out: E * sum_e (top-k slots on e / tokens) * (mean probability of e)."""
    probs = F.softmax(torch.cat(logits).double(), dim=-1)
    chosen = probs.topk(top_k, dim=-1).indices.tolist()
    tokens = probs.shape[0]
    return num_experts * sum(sum(e in row for row in chosen) / tokens * probs[:, e].mean().item()
                             for e in range(num_experts))


def test_load_balancing_loss_is_transformers_formula():
    from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(37, 6, generator=g) * 2, torch.randn(53, 6, generator=g)]  # two layers, odd sizes
    ours = load_balancing_loss(logits, num_experts=6, top_k=2)
    assert ours.item() == pytest.approx(direct_load_balancing_loss(logits, 6, 2), rel=1e-6)
    assert ours.item() == pytest.approx(load_balancing_loss_func(tuple(logits), 6, 2).item(), rel=1e-6)
    uniform = [torch.zeros(8, 6)]            # every expert equally likely: the loss is top_k
    assert load_balancing_loss(uniform, 6, 3).item() == pytest.approx(3.0)


def test_moe_training_adds_and_logs_the_load_balancing_loss(tmp_path, corpus):
    trainers = [Trainer(config(tmp_path / str(coef), corpus, model_overrides={**MOE, "router_aux_loss_coef": coef}))
                for coef in (0.0, 10.0)]
    batch = trainers[0].data.train_batch(0, 4, 0)
    seen = []   # each router's own input, to recompute its logits independently
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(F.linear(args[0], mod.weight).detach()))
             for m in trainers[1].model.modules() if isinstance(m, Router)]
    with torch.no_grad():
        trainers[1].model(torch.from_numpy(batch[:, :-1]))
    for h in hooks:
        h.remove()
    for trainer in trainers:
        trainer.train_step()
    assert trainers[1].aux_loss == pytest.approx(direct_load_balancing_loss(seen, 4, 2), rel=1e-5)
    assert trainers[0].aux_loss == pytest.approx(trainers[1].aux_loss, rel=1e-6)   # logged whatever its weight
    router = "model.layers.0.mlp.gate.weight"
    moved = [dict(t.model.named_parameters())[router] for t in trainers]
    assert not torch.allclose(moved[0], moved[1])                                   # and it trains the routers
    trainers[1].cfg.steps, trainers[1].cfg.eval_every = 2, 100
    trainers[1].train()
    assert "aux_loss" in losses(trainers[1].out)[0]


def test_compiled_step_traces_whole_layers_and_matches_eager(tmp_path, corpus, monkeypatch):
    """fullgraph=True fails on any graph break, so this checks that every layer (dense, and the token mixers of
    MoE layers) and the loss trace whole. Dynamo's `eager` backend runs the captured graphs without Inductor,
    whose C++ build takes minutes on two cores; tests/test_train_gpu.py runs Inductor on CUDA."""
    import train.trainer
    from train.compiling import cross_entropy
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    monkeypatch.setattr(train.trainer, "compiled_cross_entropy", torch.compile(cross_entropy, fullgraph=True))
    torch._dynamo.reset()
    for overrides in (MICRO, MOE):
        runs = []
        for compiled in (False, True):
            trainer = Trainer(config(tmp_path / str(compiled), corpus, model_overrides=overrides, seq_len=80,
                                     compile=compiled))
            runs.append([trainer.train_step() for _ in range(3)] + [trainer.evaluate()])
        assert runs[1] == pytest.approx(runs[0], rel=1e-6)


def test_out_of_memory_saves_progress_and_names_the_options(tmp_path, corpus, monkeypatch):
    trainer = Trainer(config(tmp_path, corpus, grad_accum=2))
    real_loss = trainer.loss

    def loss(batch):
        if trainer.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(batch)
    monkeypatch.setattr(trainer, "loss", loss)
    with pytest.raises(TrainingOutOfMemory) as caught:
        trainer.train()
    message = str(caught.value)
    for option in ("--batch-size (now 4)", "--seq-len (now 32)", "--grad-accum (now 2)", "--parallel fsdp",
                   "step 3", "checkpoint step 2"):
        assert option in message
    assert "\n" not in message
    state = torch.load(Path(trainer.out) / "checkpoints" / "step-0000002" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["position"] == 2 * 4 * 2    # the failed step consumed nothing
