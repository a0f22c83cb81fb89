"""Both benches on a CUDA device (skipped elsewhere). On the GPU machine, with the gpu wheels on PYTHONPATH:

    python -m pytest -q tests/test_bench_gpu.py -s
"""

import argparse
import json

import pytest
import torch

from tests.conftest import randomize, small_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_every_kernel_implementation_runs_on_cuda_within_bfloat16_error():
    from bench import kernels as registry
    from bench.kernels.__main__ import measure
    args = argparse.Namespace(warmup=1, repeats=3, seed=0, timing="graph")
    for kernel in registry.KERNELS:
        for impl in (i for i in registry.IMPLS if i.kernel == kernel.name):
            if impl.needs("cuda"):
                print(f"\n{kernel.key} {impl.name}: {impl.needs('cuda')}")
                continue
            for shape in (kernel.shapes[0], kernel.shapes[-1]):    # tiny, and the largest (Qwen3-Next or small)
                row = measure(kernel, impl, shape, torch.bfloat16, "cuda", args)
                print(f"\n{kernel.key} {impl.name} {row['label']}: {row.get('median_ms')} ms ({row['timing']}), "
                      f"error {row['rel_error']} (state {row.get('state_rel_error')})")
                assert row["status"] == "ok", row["reason"]
                # The project's kernels and references are timed inside CUDA graphs, as the engines run them.
                if impl.name in ("reference", "triton", "triton-rows"):
                    assert row["timing"] == "graph" and row["repeats"] == 10
                assert row["rel_error"] < 2e-2
                # Stateless kernels (attention over a cache, the fused products) have no state to compare.
                assert row["state_rel_error"] is None or row["state_rel_error"] < 2e-2


def test_bench_of_a_cuda_artifact(tmp_path):
    from bench.__main__ import main as bench_main
    from export.__main__ import main as export_main
    from model import Qwen3NextForCausalLM
    config = small_config(linear_key_head_dim=64, linear_value_head_dim=64, max_position_embeddings=256)
    randomize(Qwen3NextForCausalLM(config), seed=5, scale=0.05).save_pretrained(tmp_path / "ckpt")
    art = tmp_path / "art"
    assert export_main([str(tmp_path / "ckpt"), "--out", str(art), "--device", "cuda", "--dtype", "bfloat16",
                        "--target", "torch", "--max-batch", "4", "--max-seq-len", "128"]) == 0
    out = tmp_path / "report"
    assert bench_main([str(art), "--out", str(out), "--device", "cuda", "--prompt-lengths", "16", "64", "--batches",
                       "1", "4", "--repeats", "2", "--decode-steps", "4", "--generate-tokens", "0",
                       "--accuracy-steps", "16", "--drift-steps", "32"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["environment"]["device"]["name"] == torch.cuda.get_device_name(0)
    assert 100 < rep["copy_bandwidth"]["gb_per_s"] < 20000
    for name in ("eager", "hf", "torch"):
        b = rep["backends"][name]
        print(f"\n{name}: {b['status']} {b['reason'] or ''} memory {b['memory']} accuracy {b['accuracy']} "
              f"drift {b['drift']}")
        assert b["status"] == "ok"
        assert b["memory"]["peak_bytes"] > 0 and "allocator" in b["memory"]["method"]
        assert 0 < b["decode"][0]["fraction_of_copy_bandwidth"] < 2
        assert b["accuracy"]["rel_error"] < 5e-2 and b["drift"]["state_rel_error"] < 5e-2
    assert rep["backends"]["onnxruntime"]["status"] == "unavailable"
