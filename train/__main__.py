"""Train a Qwen3-Next-style model and write HF-format checkpoints.

Examples:
  python -m train --out runs/tiny                          # tiny preset on the Python stdlib's source
  python -m train --data notes/ --out runs/n --steps 2000 --batch-size 16 --seq-len 512
  python -m train --out runs/tiny --resume --steps 600     # continue the latest checkpoint to step 600
  torchrun --nproc-per-node 2 -m train --out runs/2gpu     # two GPUs share each batch (DDP or FSDP2)

--out then holds config.json, model.safetensors and tokenizer.json (load them with
Qwen3NextForCausalLM.from_pretrained or transformers), checkpoints/step-N/ with optimizer, RNG and
data-position state for --resume, and log.jsonl with one record per step. Ctrl-C saves a checkpoint first.

On CUDA each layer's training step is compiled (torch.compile; the first step takes a minute or two), AdamW is
fused and the forward runs in bf16. Under torchrun every process trains on its slice of each batch, so
--batch-size is the global micro-batch and a run on N GPUs follows the same data as one on a single GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from model import cli
from model.config import PRESETS


def build_parser() -> argparse.ArgumentParser:
    from .distributed import PARALLEL_CHOICES
    from .trainer import CPU_BATCH, GPU_BATCH, TrainConfig
    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("data and output")
    io.add_argument("--data", help="a text file or a directory of text files (default: the Python stdlib's source)")
    io.add_argument("--out", required=True, help="directory for the model and its checkpoints: a new or empty one, "
                    "or an earlier run with --resume or --overwrite")
    io.add_argument("--overwrite", action="store_true", help="start afresh in --out even if it holds a run (its "
                    "checkpoints, log.jsonl and model files are deleted) or other files (left alone)")
    io.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE on the corpus)")
    io.add_argument("--cache-dir", default=d["cache_dir"], help="where tokenizers and token streams are cached "
                    "(default: %(default)s)")
    io.add_argument("--val-fraction", type=cli.real(0, 0.5), default=d["val_fraction"],
                    help="held-out share of sequences, at most 0.5 (0: a single sequence; default: %(default)s)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=d["preset"], choices=sorted(PRESETS), help="model size (default: %(default)s)")
    m.add_argument("--model-config", metavar="JSON",
                   help='overrides of preset fields, e.g. \'{"num_hidden_layers": 4}\' '
                   "(default: none)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=cli.integer(1), help=f"optimizer steps in total (default: {d['steps']}, or the "
                   "resumed run's)")
    gpu = ", ".join(f"{name} {rows}" for name, (rows, _) in GPU_BATCH.items())
    o.add_argument("--batch-size", type=cli.integer(1), help="sequences per micro-batch, over all processes "
                   f"(default: {CPU_BATCH[0]} per process on CPU; per GPU: {gpu})")
    gpu = ", ".join(f"{name} {tokens}" for name, (_, tokens) in GPU_BATCH.items())
    o.add_argument("--seq-len", type=cli.integer(2), help=f"tokens per sequence (default: {CPU_BATCH[1]} on CPU; "
                   f"on CUDA: {gpu})")
    o.add_argument("--grad-accum", type=cli.integer(1), default=d["grad_accum"],
                   help="micro-batches per optimizer step (default: %(default)s)")
    o.add_argument("--lr", type=cli.real(0, lo_open=True), default=d["lr"], help="peak learning rate (default: "
                   "%(default)s)")
    o.add_argument("--warmup-steps", type=cli.integer(0), default=d["warmup_steps"],
                   help="steps of linear warmup to --lr (0: none; default: %(default)s)")
    o.add_argument("--weight-decay", type=cli.real(0), default=d["weight_decay"],
                   help="AdamW weight decay (0: none; default: %(default)s)")
    o.add_argument("--grad-clip", type=cli.real(0, lo_open=True), default=d["grad_clip"],
                   help="largest gradient norm; larger gradients are scaled down (default: %(default)s)")
    o.add_argument("--seed", type=cli.integer(0), default=d["seed"],
                   help="seed for weights and data order, >= 0 (default: %(default)s)")
    r = p.add_argument_group("running")
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, with its "
                   "settings (only --steps, intervals, --device, --kernels, --compile and --parallel may change)")
    r.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--kernels", choices=["auto", "torch"], help="auto: on CUDA the gated delta rule's serial "
                   "scan and the conv run as Triton kernels (forward and backward); torch: the PyTorch reference "
                   "everywhere (default: auto)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, help="compile each layer's training step "
                   "with torch.compile, tracing the PyTorch reference kernels around those Triton kernels "
                   "(default: on for CUDA, off for CPU)")
    r.add_argument("--parallel", choices=PARALLEL_CHOICES, help="under torchrun: ddp replicates the model, "
                   "fsdp (FSDP2) shards parameters, gradients and optimizer state over the processes (default: auto, "
                   "ddp below 100M parameters as for tiny, fsdp from there as for small and small-moe)")
    r.add_argument("--eval-every", type=cli.integer(1),
                   help=f"steps between validation runs (default: {d['eval_every']})")
    r.add_argument("--save-every", type=cli.integer(1), help=f"steps between checkpoints (default: {d['save_every']})")
    r.add_argument("--log-every", type=cli.integer(1), help=f"steps between log lines (default: {d['log_every']})")
    r.add_argument("--sample-tokens", type=cli.integer(0), default=d["sample_tokens"],
                   help="tokens to sample from the trained model at the end (0: none; default: %(default)s)")
    return p


def check_out(args) -> None:
    """--out must not lose an earlier run: refuse it, continue it (--resume) or clear it (--overwrite)."""
    from pathlib import Path
    from model.io import OutputDirError, check_output_dir
    from .trainer import is_run

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise OutputDirError("--resume continues the run in --out and --overwrite starts it afresh; pass one")
    if not args.resume and not args.overwrite and is_run(out):
        raise OutputDirError(f"--out {out} holds a training run; continue it with --resume, choose another --out, "
                             "or pass --overwrite to start afresh there (deleting its checkpoints)")
    check_output_dir(out, what="training run", ours=is_run, overwrite=args.overwrite, in_place=True,
                     sources=[x for x in (args.data, args.tokenizer) if x])


def build_config(args):
    from pathlib import Path
    from model.errors import CheckpointError, ConfigError
    from .trainer import TrainConfig, latest_checkpoint, read_trainer_state

    runtime = {k: getattr(args, k) for k in ("steps", "eval_every", "save_every", "log_every", "device", "kernels",
                                             "compile", "parallel")
               if getattr(args, k) is not None}
    if args.resume:
        ckpt = latest_checkpoint(Path(args.out))
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint under {Path(args.out) / 'checkpoints'}; "
                                  "start without --resume or point --out at an earlier run")
        # --out decides where a resumed run writes, wherever the run was first written (it may have moved).
        return TrainConfig(**{**read_trainer_state(ckpt)["train_config"], **runtime, "out": args.out})
    try:
        overrides = json.loads(args.model_config) if args.model_config else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--model-config is not valid JSON ({e})") from e
    if not isinstance(overrides, dict):
        raise ConfigError(f"--model-config must be a JSON object of config fields, got {args.model_config}")

    def absolute(path):   # a resumed run may start from another directory
        return str(Path(path).resolve()) if path else None
    return TrainConfig(out=args.out, data=absolute(args.data), preset=args.preset, model_overrides=overrides,
                       tokenizer=absolute(args.tokenizer), cache_dir=args.cache_dir, batch_size=args.batch_size,
                       seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed,
                       val_fraction=args.val_fraction, sample_tokens=args.sample_tokens, **runtime)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from model.errors import ConfigError, NextDeployError
    from model.generate import eager_step, generate_ids
    from model.model import Qwen3NextForCausalLM
    from model.sampling import Sampler, SamplingConfig
    from . import distributed
    from .trainer import Trainer, TrainingOutOfMemory, clear_run

    processes = distributed.Processes()
    logging.basicConfig(level=logging.INFO if processes.is_main else logging.WARNING, format="%(message)s")
    say = print if processes.is_main else (lambda *_, **__: None)
    try:
        check_out(args)
        trainer = Trainer(build_config(args))
        if args.resume:
            say(f"resumed from {trainer.resume()} at step {trainer.step}", flush=True)
            if trainer.step >= trainer.cfg.steps:
                raise ConfigError(f"the run is at step {trainer.step} of its {trainer.cfg.steps}; pass a larger "
                                  "--steps to train further")
        elif args.overwrite and processes.is_main:
            clear_run(trainer.out)
        say(f"model: {trainer.cfg.preset}, {trainer.num_parameters / 1e6:.1f}M parameters; {trainer.describe()}; "
            f"{trainer.data.num_train} training / {trainer.data.num_val} validation sequences", flush=True)
        result = trainer.train()
    except NextDeployError as e:
        # Every process has the same settings and inputs, so rank 0 reports for all; running out of memory is
        # each process's own.
        if processes.is_main or isinstance(e, TrainingOutOfMemory):
            print(f"error: {e}", file=sys.stderr)
        return 2
    distributed.stop()
    say(f"saved {result['checkpoint']} (and the model at the top of {args.out})")
    if result["interrupted"]:
        say(f"interrupted at step {trainer.step}; continue with: {distributed.launcher(processes.world_size)} train "
            f"--out {args.out} --resume")
        return 130
    if trainer.cfg.sample_tokens and processes.is_main:
        # The model just saved, as one plain module: the trained one may be sharded or compiled for training.
        model, tok = Qwen3NextForCausalLM.from_pretrained(args.out, device=trainer.device), trainer.tokenizer
        state = model.new_state(1, trainer.cfg.sample_tokens + 8)
        prompt = "def "
        ids = generate_ids(eager_step(model, state), tok.encode(prompt), trainer.cfg.sample_tokens,
                           Sampler(SamplingConfig(temperature=0.8, top_p=0.95, seed=0)), {tok.eos_id})
        print("sample:\n" + prompt + "".join(tok.stream(ids)))
    return 0


if __name__ == "__main__":
    cli.run(main)
