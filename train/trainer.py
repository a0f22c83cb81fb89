"""The training loop: AdamW, warmup + cosine decay, clipping, accumulation, checkpoints, exact resume."""

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
import torch.nn.functional as F
from tqdm import tqdm

from model import kernels
from model.config import Qwen3NextConfig, preset
from model.device import torch_device
from model.errors import CheckpointError, ConfigError
from model.io import atomic_directory
from model.model import Qwen3NextForCausalLM

from .data import prepare

TRAINER_STATE = "trainer_state.pt"
LOG = "log.jsonl"
# What a run writes at the top of --out beside checkpoints/ (save_pretrained and Tokenizer.save), and the log.
RUN_FILES = (LOG, "config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json")


@dataclass
class TrainConfig:
    out: str
    data: str | None = None
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None
    cache_dir: str = str(Path.home() / ".cache" / "next-deploy")
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
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
        state = torch.load(path, weights_only=False, map_location="cpu")
        problem = None if isinstance(state, dict) and {"train_config", "step"} <= state.keys() else "not ours"
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        problem = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if problem:
        raise CheckpointError(f"{path} is unreadable ({problem}); delete {checkpoint} to resume from the "
                              "checkpoint before it")
    return state


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = torch_device(cfg.device)
        kernels.use_kernels(cfg.kernels)
        base = preset(cfg.preset, **cfg.model_overrides)
        self.tokenizer, self.data = prepare(cfg.data, cfg.seq_len, base.vocab_size, cfg.tokenizer,
                                            Path(cfg.cache_dir), cfg.val_fraction)
        self.model_config = self._model_config(base)
        torch.manual_seed(cfg.seed)
        self.model = Qwen3NextForCausalLM(self.model_config).to(self.device)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2 or "embed" in n]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
        self.step = 0
        self.position = 0  # sequences consumed from the training stream
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
        path = self.out / "checkpoints" / f"step-{self.step:07d}"
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save(tmp)
            torch.save({
                "step": self.step, "position": self.position, "train_config": dataclasses.asdict(self.cfg),
                "optimizer": self.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            }, tmp / TRAINER_STATE)
        # The newest weights also sit at the top of --out, so the directory is a loadable checkpoint itself.
        self.model.save_pretrained(self.out)
        self.tokenizer.save(self.out)
        return path

    def resume(self) -> Path:
        path = latest_checkpoint(self.out)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.out / 'checkpoints'}; "
                                  "start without --resume or point --out at an earlier run")
        state = read_trainer_state(path)
        saved = Qwen3NextForCausalLM.from_pretrained(path)
        if saved.config.to_dict() != self.model_config.to_dict():
            raise ConfigError(f"the checkpoint at {path} was trained with a different model config; resume with "
                              "the same --preset, tokenizer and corpus as the original run")
        self.model.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.position = state["step"], state["position"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return path

    # ---- loop ----------------------------------------------------------------------------------

    def loss(self, batch: np.ndarray) -> torch.Tensor:
        tokens = torch.from_numpy(batch).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = [self.loss(b).item() for b in self.data.val_batches(self.cfg.batch_size, self.cfg.eval_batches)]
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> float:
        cfg = self.cfg
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = self.data.train_batch(self.position, cfg.batch_size, cfg.seed)
            self.position += cfg.batch_size
            loss = self.loss(batch) / cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def log(self, record: dict) -> None:
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _request_stop(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C leaves at once
            raise KeyboardInterrupt
        self.stop_requested = True
        tqdm.write("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abandon it)")

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        result = {"interrupted": False}
        try:
            while self.step < cfg.steps and not self.stop_requested:
                t0 = time.perf_counter()
                loss = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                tok_s = tokens_per_step / (time.perf_counter() - t0)
                record = {"step": self.step, "loss": loss, "lr": cfg.lr_at(self.step - 1), "tokens_per_s": tok_s}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    record["val_loss"] = self.evaluate()
                    tqdm.write(f"step {self.step}: val loss {record['val_loss']:.4f}")
                self.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
                if self.step % cfg.log_every == 0:
                    tqdm.write(f"step {self.step}: loss {loss:.4f} lr {record['lr']:.2e} {tok_s:,.0f} tokens/s")
                if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                result.update(record)
            result["interrupted"] = self.stop_requested
            result["checkpoint"] = str(self.save_checkpoint())
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous_handler)
        return result
