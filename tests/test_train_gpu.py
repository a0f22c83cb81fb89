"""Training on CUDA: the Inductor-compiled step against the eager one, a real out-of-memory error, and two GPUs
(NCCL) against one. Speed is measured by bench/gpu_check_train.sh, never asserted here."""

import pytest
import torch

from tests.test_train import MICRO, config, corpus, losses  # noqa: F401  (corpus is a fixture)
from tests.test_train_parallel import cli_args, torchrun
from train.__main__ import main as train_main
from train.trainer import Trainer, TrainingOutOfMemory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device (bench/gpu_check_train.sh runs these)")]
# Wide enough that bf16 rounding stays small against the loss changes it is compared with.
WIDER = dict(MICRO, hidden_size=128, intermediate_size=256, head_dim=32, linear_key_head_dim=32,
             linear_value_head_dim=32)


def test_compiled_step_matches_eager_on_cuda(tmp_path, corpus):
    runs = []
    for compiled in (False, True):
        trainer = Trainer(config(tmp_path / str(compiled), corpus, model_overrides=WIDER, seq_len=128, device="cuda",
                                 compile=compiled))
        assert trainer.compiled == compiled and trainer.optimizer.param_groups[0]["fused"]
        runs.append([trainer.train_step() for _ in range(4)] + [trainer.evaluate()])
    assert runs[1] == pytest.approx(runs[0], rel=2e-2)


def test_gpu_out_of_memory_is_one_line_that_names_the_options(tmp_path, corpus):
    trainer = Trainer(config(tmp_path, corpus, seq_len=1024, batch_size=20000, device="cuda", compile=False))
    with pytest.raises(TrainingOutOfMemory) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(f"{trainer.device} ran out of memory at step 1") and "\n" not in message
    assert all(option in message for option in ("--batch-size", "--seq-len", "--grad-accum", "--parallel fsdp"))
    torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_match_one(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")   # the lent machines must not use NVLink multicast
    one = cli_args(tmp_path, corpus, "one", WIDER)
    one[one.index("--device") + 1] = "cuda"
    assert train_main(one) == 0
    torchrun(*cli_args(tmp_path, corpus, "two", WIDER)[:-2], "--device", "cuda")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=2e-2)
