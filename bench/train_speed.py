"""Training speed of `python -m train` on GPUs: tokens/s, model FLOPs utilisation, and 1- vs 2-GPU loss curves.

    python -m bench.train_speed one-gpu --out DIR   # tiny compiled vs eager at the GPU defaults, small's MFU
    python -m bench.train_speed two-gpu --out DIR   # 1 vs 2 GPUs at the same global batch: speed-up and curves

Each run is a real `python -m train` (or `torchrun ... -m train`) on the default corpus; tokens/s is the median
of log.jsonl's per-step figures after the first third of the steps (compilation and warm-up). Runs that do not
fit the time budget are skipped and say so. A table goes to stdout; every run's log, stderr and the figures go
under DIR.

MFU counts the FLOPs of the model (forward + backward = 3x forward) per token: 2 per active weight (embedding
table excluded; routed experts count num_experts_per_tok of num_experts), causal attention 2*T*d per query head
per full-attention layer, and the chunked gated delta rule 4CK + C(K+V) + 2CV + 6KV per value head per
linear-attention layer (chunk C = 64: the intra-chunk QK^T and KK^T, the triangular solve, the intra-chunk
attention and the three state products). Peak: 989 TFLOP/s dense bf16 (H100 / H200 SXM) unless PEAK_TFLOPS says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from model import cli

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64


def flops_per_token(config: dict, seq_len: int) -> float:
    """Training FLOPs per token of the model described by an HF config.json (see the module docstring)."""
    import torch
    from model.config import Qwen3NextConfig
    from model.model import Qwen3NextForCausalLM
    cfg = Qwen3NextConfig.from_dict(config)
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg)
    weights = 0.0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        share = cfg.num_experts_per_tok / cfg.num_experts if ".mlp.experts." in name else 1.0
        weights += p.numel() * share
    forward = 2 * weights
    forward += len(cfg.full_attention_layers) * 2 * seq_len * cfg.head_dim * cfg.num_attention_heads
    K, V, C = cfg.linear_key_head_dim, cfg.linear_value_head_dim, CHUNK
    per_head = 4 * C * K + C * (K + V) + 2 * C * V + 6 * K * V
    forward += len(cfg.linear_attention_layers) * cfg.linear_num_value_heads * per_head
    return 3 * forward


def peak_flops() -> tuple[float, str]:
    import torch
    name = torch.cuda.get_device_name()
    return float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12, name


class Bench:
    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.results: list[dict] = []

    def run(self, name: str, gpus: int, args: list[str], expect_s: float, limit_s: float) -> dict:
        """One training run; skipped when less than `expect_s` of the budget is left, stopped at `limit_s`."""
        run_dir = self.out / "runs" / name
        result = {"name": name, "gpus": gpus, "args": args}
        left = self.deadline - time.monotonic()
        if left < expect_s:
            result["status"] = f"skipped ({left:.0f} s of the budget left, needs ~{expect_s:.0f} s)"
            self.results.append(result)
            return result
        launcher = [sys.executable, "-m", "train"] if gpus == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m", "train"]
        command = launcher + ["--out", str(run_dir), "--cache-dir", str(self.out / "cache"), "--sample-tokens", "0",
                              "--eval-every", "100000", "--save-every", "100000", "--log-every", "10"] + args
        result["command"] = " ".join(command)
        t0 = time.monotonic()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            stderr = proc.communicate(timeout=min(limit_s, left))[1]
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun passes it on to its workers, which would otherwise hold the GPUs.
            proc.terminate()
            try:
                stderr = proc.communicate(timeout=60)[1]
            except subprocess.TimeoutExpired:
                proc.kill()
                stderr = proc.communicate()[1]
            status = "timed out"
        result["wall_s"] = round(time.monotonic() - t0, 1)
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        (self.out / "runs" / f"{name}.stderr").write_text(stderr)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if errors:
            status += ": " + errors[0][len("error: "):]
        result["status"] = status
        log = run_dir / "log.jsonl"
        if log.is_file():
            records = [json.loads(line) for line in log.read_text().splitlines()]
            result["loss"] = [r["loss"] for r in records]
            speeds = [r["tokens_per_s"] for r in records][len(records) // 3:]
            if speeds:
                result["tokens_per_s"] = statistics.median(speeds)
        if (run_dir / "config.json").is_file() and "tokens_per_s" in result:
            seq_len = int(args[args.index("--seq-len") + 1]) if "--seq-len" in args else None
            config = json.loads((run_dir / "config.json").read_text())
            result["flops_per_token"] = flops_per_token(config, seq_len or default_seq_len(args))
            peak, device = peak_flops()
            result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / (peak * gpus)
            result["device"] = device
        self.results.append(result)
        return result

    def save(self, table: str) -> None:
        (self.out / "train_speed.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "table.txt").write_text(table + "\n")
        print(table)


def default_seq_len(args: list[str]) -> int:
    from train.trainer import GPU_BATCH
    preset = args[args.index("--preset") + 1] if "--preset" in args else "tiny"
    return GPU_BATCH[preset][1]


def speed_rows(results: list[dict]) -> list[str]:
    rows = [f"{'run':<34} {'GPUs':>4} {'tokens/s':>12} {'MFU':>6}  status"]
    for r in results:
        speed = f"{r['tokens_per_s']:>12,.0f}" if "tokens_per_s" in r else f"{'-':>12}"
        mfu = f"{100 * r['mfu']:>5.1f}%" if "mfu" in r else f"{'-':>6}"
        rows.append(f"{r['name']:<34} {r['gpus']:>4} {speed} {mfu}  {r['status']}")
    return rows


def curve_gap(a: dict, b: dict) -> str:
    if not a.get("loss") or not b.get("loss") or len(a["loss"]) != len(b["loss"]):
        return "not comparable (a run failed or was skipped)"
    gaps = [abs(x - y) for x, y in zip(a["loss"], b["loss"])]
    tail = gaps[-20:]
    return (f"max |dloss| {max(gaps):.4f}, mean |dloss| over the last {len(tail)} steps "
            f"{sum(tail) / len(tail):.4f}, final losses {a['loss'][-1]:.4f} / {b['loss'][-1]:.4f}")


def one_gpu(bench: Bench) -> str:
    tiny = ["--preset", "tiny"]
    bench.run("tiny compiled, defaults (128x1024)", 1, tiny + ["--steps", "40"], expect_s=120, limit_s=300)
    bench.run("tiny eager, defaults (128x1024)", 1, tiny + ["--steps", "15", "--no-compile"], expect_s=45, limit_s=150)
    bench.run("small compiled, defaults (8x2048)", 1, ["--preset", "small", "--steps", "25"], expect_s=150,
              limit_s=330)
    bench.run("tiny eager, 16x512 (before)", 1, tiny + ["--steps", "30", "--no-compile", "--batch-size", "16",
                                                        "--seq-len", "512"], expect_s=40, limit_s=90)
    rows = speed_rows(bench.results)
    compiled, eager = bench.results[0], bench.results[1]
    if "tokens_per_s" in compiled and "tokens_per_s" in eager:
        rows.append(f"tiny: compiled / eager at the defaults = {compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}x"
                    " (goal: >= 1,000,000 tokens/s compiled)")
    rows.append("small: goal >= 40% MFU")
    return "\n".join(rows)


def two_gpu(bench: Bench) -> str:
    # Global batch 256 x 1024 in both: one GPU accumulates two micro-batches of 128, two GPUs take 128 each, so
    # every GPU runs the same micro-batch and both runs see the same sequences in the same order.
    same = ["--preset", "tiny", "--steps", "60", "--seq-len", "1024"]
    one = bench.run("tiny 1 GPU, 128 x 2 accumulated", 1, same + ["--batch-size", "128", "--grad-accum", "2"],
                    expect_s=120, limit_s=300)
    ddp = bench.run("tiny 2 GPUs DDP, 256", 2, same + ["--batch-size", "256", "--parallel", "ddp"],
                    expect_s=60, limit_s=240)
    fsdp = bench.run("tiny 2 GPUs FSDP, 256", 2, same + ["--batch-size", "256", "--parallel", "fsdp"],
                     expect_s=60, limit_s=240)
    bench.run("small 2 GPUs FSDP, defaults (2 x 8x2048)", 2, ["--preset", "small", "--steps", "20"],
              expect_s=150, limit_s=330)
    again = bench.run("tiny 1 GPU again (noise floor)", 1, same + ["--batch-size", "128", "--grad-accum", "2"],
                      expect_s=60, limit_s=200)
    rows = speed_rows(bench.results)
    if "tokens_per_s" in one and "tokens_per_s" in ddp:
        rows.append(f"tiny: 2 GPUs / 1 GPU = {ddp['tokens_per_s'] / one['tokens_per_s']:.2f}x (goal: >= 1.8x)")
    rows.append(f"loss curves, 1 GPU vs 2 GPUs DDP:  {curve_gap(one, ddp)}")
    rows.append(f"loss curves, 1 GPU vs 2 GPUs FSDP: {curve_gap(one, fsdp)}")
    rows.append(f"loss curves, 1 GPU vs 1 GPU again: {curve_gap(one, again)}  (bf16 noise floor)")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", choices=["one-gpu", "two-gpu"])
    parser.add_argument("--out", required=True, help="directory for the runs, their logs and the figures; an "
                        "earlier one is added to, any other non-empty directory refused")
    parser.add_argument("--budget-s", type=cli.real(0, lo_open=True), default=450,
                        help="wall-clock budget for all runs (default: %(default)s); runs that would not fit are "
                        "skipped")
    return parser


def is_train_speed_dir(directory: Path) -> bool:
    return (directory / "train_speed.json").is_file() or (directory / "runs").is_dir()


def main(argv=None) -> int:
    from model.io import check_output_dir
    args = build_parser().parse_args(argv)
    out = check_output_dir(args.out, what="training benchmark", ours=is_train_speed_dir)
    os.environ["NCCL_NVLS_ENABLE"] = "0"   # never NVLink multicast on the lent machines
    bench = Bench(out, args.budget_s)
    bench.save((one_gpu if args.plan == "one-gpu" else two_gpu)(bench))
    return 0


if __name__ == "__main__":
    cli.run(main)
