"""The training loop: AdamW, warmup + cosine decay, clipping, accumulation, checkpoints, exact resume.

On CUDA the step is compiled per layer (compiling.py), AdamW is fused and the forward runs under bf16 autocast;
under torchrun the processes share each global batch (distributed.py). MoE models add the routers'
load-balancing loss (moe.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import kernels
from model.checkpoint import save_state_dict
from model.config import Qwen3NextConfig, preset
from model.device import torch_device
from model.errors import CheckpointError, ConfigError, NextDeployError
from model.io import atomic_directory
from model.model import Qwen3NextForCausalLM

from . import distributed
from .compiling import compile_layers, compiled_cross_entropy, cross_entropy
from .data import prepare
from .moe import RouterLogits

TRAINER_STATE = "trainer_state.pt"
LOG = "log.jsonl"
# What a run writes at the top of --out beside checkpoints/ (save_pretrained and Tokenizer.save), and the log.
RUN_FILES = (LOG, "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json")
CPU_BATCH = (8, 128)  # sequences per process, tokens per sequence
# Per GPU: about the most tokens per step that fit an 80 GB GPU with room to spare (compiled or not).
GPU_BATCH = {"tiny": (128, 1024), "small": (8, 2048), "small-moe": (8, 2048)}


class TrainingOutOfMemory(NextDeployError):
    """The device ran out of memory; the message names the options that shrink a step."""


@dataclass
class TrainConfig:
    out: str
    data: str | None = None
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None
    cache_dir: str = str(Path.home() / ".cache" / "next-deploy")
    steps: int = 200
    batch_size: int | None = None  # sequences per micro-batch over all processes; None: the device's default
    seq_len: int | None = None     # None: the device's default (CPU_BATCH, GPU_BATCH)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.02
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    log_every: int = 10
    device: str = "auto"
    kernels: str = "auto"
    compile: bool | None = None    # None: on for CUDA, off for CPU
    parallel: str = "auto"         # with several processes: ddp, fsdp, or auto (distributed.choose_parallel)
    sample_tokens: int = 48

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def sized_for(cfg: TrainConfig, device: torch.device, processes: int) -> TrainConfig:
    """`cfg` with the device's default batch size and sequence length filled in, checked against the number
    of processes that share each batch."""
    rows, tokens = GPU_BATCH.get(cfg.preset, CPU_BATCH) if device.type == "cuda" else CPU_BATCH
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size or rows * processes, seq_len=cfg.seq_len or tokens)
    if cfg.batch_size % processes:
        fits = -(-cfg.batch_size // processes) * processes
        raise ConfigError(f"--batch-size {cfg.batch_size} sequences cannot be shared evenly by {processes} processes "
                          f"(torchrun --nproc-per-node {processes}); use a multiple of {processes} such as {fits}, "
                          "or another --nproc-per-node")
    return cfg


def is_run(out: Path) -> bool:
    """Whether `out` holds a run of `python -m train`: a checkpoint or a training log."""
    return (out / LOG).is_file() or any((p / TRAINER_STATE).is_file() for p in (out / "checkpoints").glob("step-*"))


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote in `out` (--overwrite), and nothing else."""
    if not is_run(out):
        return
    for pattern in ("step-*", ".step-*"):   # checkpoints, and the temporary directories of interrupted saves
        for checkpoint in (out / "checkpoints").glob(pattern):
            shutil.rmtree(checkpoint)
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def read_trainer_state(checkpoint: Path) -> dict:
    """The optimizer, RNG, data position and settings saved with a checkpoint."""
    path = checkpoint / TRAINER_STATE
    try:
        # Mapped, not read: resuming looks at the settings first, and the optimizer state can be gigabytes.
        state = torch.load(path, weights_only=False, map_location="cpu", mmap=True)
        problem = None if isinstance(state, dict) and {"train_config", "step"} <= state.keys() else "not ours"
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if problem:
        raise CheckpointError(f"{path} is unreadable ({problem}); delete {checkpoint} to resume from the "
                              "checkpoint before it")
    return state


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.processes = distributed.Processes()
        device = torch_device(cfg.device)
        self.cfg = cfg = sized_for(cfg, device, self.processes.world_size)
        self.out = Path(cfg.out)
        self.device = self.processes.start(device)
        self.compiled = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        # Compiled steps trace the reference kernels around the gated delta rule's Triton scan (model.kernels).
        kernels.use_kernels(cfg.kernels)
        self.cross_entropy = compiled_cross_entropy if self.compiled else cross_entropy
        base = preset(cfg.preset, **cfg.model_overrides)
        self.tokenizer, self.data = self.processes.main_first(lambda: prepare(
            cfg.data, cfg.seq_len, base.vocab_size, cfg.tokenizer, Path(cfg.cache_dir), cfg.val_fraction))
        self.model_config = self._model_config(base)
        torch.manual_seed(cfg.seed)
        self.model = Qwen3NextForCausalLM(self.model_config).to(self.device)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        if self.compiled:
            compile_layers(self.model)
        self.parallel = distributed.choose_parallel(cfg.parallel, self.num_parameters) \
            if self.processes.distributed else "none"
        self.train_model = distributed.parallelize(self.model, self.parallel, self.processes)
        self.router_logits = RouterLogits(self.model) if self.model_config.num_experts else None
        # Built after parallelize: FSDP replaces the parameters by sharded ones.
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "embed" in n]
        self.fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=self.fused)
        self.step = 0
        self.position = 0  # sequences consumed from the training stream
        self.saved_step = None
        self.aux_loss = None  # the last step's load-balancing loss (MoE models)
        self.stop_requested = False

    def _model_config(self, base: Qwen3NextConfig) -> Qwen3NextConfig:
        """The preset with its overrides, plus the tokenizer's special ids and room for --seq-len."""
        tok = self.tokenizer
        config = dataclasses.replace(base, eos_token_id=tok.eos_id, bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                                     max_position_embeddings=max(self.cfg.seq_len, base.max_position_embeddings))
        tok.check_fits(config.vocab_size)
        return config

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Every process calls this (gathering a sharded model is collective); rank 0 writes."""
        weights, optimizer = distributed.full_state(self.train_model, self.optimizer)
        path = self.out / "checkpoints" / f"step-{self.step:07d}"
        if self.processes.is_main:
            with atomic_directory(path) as tmp:
                save_state_dict(weights, self.model_config, tmp)
                self.tokenizer.save(tmp)
                torch.save({
                    "step": self.step, "position": self.position, "train_config": dataclasses.asdict(self.cfg),
                    "world_size": self.processes.world_size, "optimizer": optimizer,
                    "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                            "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                }, tmp / TRAINER_STATE)
            # The newest weights also sit at the top of --out, so the directory is a loadable checkpoint itself.
            save_state_dict(weights, self.model_config, self.out)
            self.tokenizer.save(self.out)
        self.processes.barrier()
        self.saved_step = self.step
        return path

    def resume(self) -> Path:
        path = latest_checkpoint(self.out)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.out / 'checkpoints'}; "
                                  "start without --resume or point --out at an earlier run")
        state = read_trainer_state(path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.processes.world_size:
            raise CheckpointError(f"{path} was written by a run of {saved_world} process(es) and this run has "
                                  f"{self.processes.world_size}; a resume is exact only with the same number: "
                                  f"{distributed.launcher(saved_world)} train --out {self.out} --resume "
                                  "(or start a new --out)")
        saved = Qwen3NextForCausalLM.from_pretrained(path)
        if saved.config.to_dict() != self.model_config.to_dict():
            raise ConfigError(f"the checkpoint at {path} was trained with a different model config; resume with "
                              "the same --preset, tokenizer and corpus as the original run")
        distributed.load_full_state(self.train_model, self.optimizer, saved.state_dict(), state["optimizer"])
        for group in self.optimizer.param_groups:
            group["fused"] = self.fused  # the saved groups carry the saving device's choice
        self.step, self.position = state["step"], state["position"]
        self.saved_step = self.step
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return path

    # ---- loop ----------------------------------------------------------------------------------

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        """The language-model loss of `batch` [rows, seq_len + 1] (this process's rows)."""
        tokens = torch.from_numpy(batch)
        if self.device.type == "cuda":  # copied from pinned memory, the batch does not wait for queued GPU work
            tokens = tokens.pin_memory()
        tokens = tokens.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.train_model(tokens[:, :-1])
        return self.cross_entropy(logits, tokens[:, 1:])

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over up to eval_batches global batches, each process taking its share of each."""
        procs = self.processes
        self.model.eval()
        means = []
        with torch.compiler.set_stance("force_eager"):  # compiled for the training shapes only
            for batch in self.data.val_batches(self.cfg.batch_size, self.cfg.eval_batches):
                mine = np.array_split(batch, procs.world_size)[procs.rank]
                # A sharded model's forward is collective, so a process without rows runs one and weighs it 0.
                loss = self.loss(mine if len(mine) else batch[:1])
                total = procs.sum(torch.stack([loss * len(mine), torch.tensor(float(len(mine)), device=self.device)]))
                means.append((total[0] / total[1]).item())
        self.model.train()
        return sum(means) / len(means)

    def train_step(self) -> float:
        """One optimizer step over batch_size * grad_accum sequences; returns their mean language-model loss."""
        cfg, procs = self.cfg, self.processes
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = cfg.batch_size // procs.world_size
        start = self.position
        totals = torch.zeros(2, device=self.device)  # language-model loss, load-balancing loss
        try:
            for i in range(cfg.grad_accum):
                batch = self.data.train_batch(self.position + procs.rank * rows, rows, cfg.seed)
                self.position += cfg.batch_size
                with distributed.gradient_sync(self.train_model, enabled=i == cfg.grad_accum - 1):
                    lm = self.loss(batch)
                    aux = self.router_logits.loss() if self.router_logits else torch.zeros((), device=self.device)
                    ((lm + self.model_config.router_aux_loss_coef * aux) / cfg.grad_accum).backward()
                totals += torch.stack([lm.detach(), aux.detach()]) / cfg.grad_accum
        except torch.OutOfMemoryError:
            # The step did not happen. (The update below allocates only in the first step, whose memory error
            # leaves nothing to save.)
            self.position = start
            self.optimizer.zero_grad(set_to_none=True)
            raise
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        lm, aux = (procs.sum(totals) / procs.world_size).tolist()
        self.aux_loss = aux if self.router_logits else None
        return lm

    def log(self, record: dict) -> None:
        if self.processes.is_main:
            with open(self.out / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.processes.is_main:
            tqdm.write(text)

    def _request_stop(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C leaves at once
            raise KeyboardInterrupt
        self.stop_requested = True
        self.say("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abandon it)")

    def _out_of_memory(self) -> TrainingOutOfMemory:
        """The error for an out-of-memory step or evaluation, after saving the progress since the last
        checkpoint where that is safe (one process: the weights are those of the last completed step)."""
        cfg, procs = self.cfg, self.processes
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not procs.distributed and self.step > 0 and self.saved_step != self.step:
            try:
                self.save_checkpoint()
            except torch.OutOfMemoryError:
                pass
        unit = "GPU" if self.device.type == "cuda" else "process"
        shard = "; with several GPUs --parallel fsdp also shards the model" if self.parallel != "fsdp" else ""
        kept = f"; checkpoint step {self.saved_step} holds the run so far" if self.saved_step else ""
        return TrainingOutOfMemory(
            f"{self.device} ran out of memory at step {self.step + 1} ({cfg.batch_size // procs.world_size} "
            f"sequences of {cfg.seq_len} tokens per {unit}); lower --batch-size (now {cfg.batch_size}) or --seq-len "
            f"(now {cfg.seq_len}) and raise --grad-accum (now {cfg.grad_accum}) to keep the batch{shard}{kept}")

    def describe(self) -> str:
        """How this run trains, in one line."""
        step = f"{'compiled per layer' if self.compiled else 'eager'}, {self.cfg.kernels} kernels"
        where = f"{self.processes.world_size} processes, {self.parallel.upper()}" if self.processes.distributed \
            else str(self.device)
        return (f"{where}; step {step}; {self.cfg.batch_size} x {self.cfg.seq_len} tokens per micro-batch, "
                f"{self.cfg.grad_accum} per step")

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not self.processes.is_main)
        result = {"interrupted": False}
        stopping = False
        try:
            while self.step < cfg.steps and not stopping:
                t0 = time.perf_counter()
                try:
                    loss = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    tok_s = tokens_per_step / (time.perf_counter() - t0)
                    record = {"step": self.step, "loss": loss, "lr": cfg.lr_at(self.step - 1), "tokens_per_s": tok_s}
                    if self.aux_loss is not None:
                        record["aux_loss"] = self.aux_loss
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        record["val_loss"] = self.evaluate()
                        self.say(f"step {self.step}: val loss {record['val_loss']:.4f}")
                except torch.OutOfMemoryError:
                    raise self._out_of_memory() from None
                self.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                if self.step % cfg.log_every == 0:
                    self.say(f"step {self.step}: loss {loss:.4f} lr {record['lr']:.2e} {tok_s:,.0f} tokens/s")
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                result.update(record)
                stopping = self.processes.any(self.stop_requested)
            result["interrupted"] = stopping
            result["checkpoint"] = str(self.save_checkpoint())
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous_handler)
        return result
