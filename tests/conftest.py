import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import Qwen3NextConfig, Qwen3NextForCausalLM

ROOT = Path(__file__).resolve().parent.parent

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
             linear_key_head_dim=8, linear_value_head_dim=8, max_position_embeddings=256)


def small_config(**overrides) -> Qwen3NextConfig:
    return Qwen3NextConfig(**{**SMALL, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights, A_log and dt_bias too) so no code path hides behind an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return randomize(Qwen3NextForCausalLM(small_config())).eval()


def eager_greedy(model, prompt_ids: list[int], steps: int, max_seq_len: int) -> list[int]:
    """`steps` greedy tokens after the prompt, from the eager model with its inference state."""
    seq = list(prompt_ids)
    with torch.no_grad():
        state = model.new_state(1, max_seq_len)
        logits = model(torch.tensor([seq]), state)[0, -1]
        for _ in range(steps):
            seq.append(int(logits.argmax()))
            logits = model(torch.tensor([[seq[-1]]]), state)[0, -1]
    return seq[len(prompt_ids):]


def terminated_at_call(n: int, fn):
    """`fn`, except that its n-th call raises what SIGTERM raises under model.cli.run (a timeout's stop)."""
    from model import cli
    calls = []

    def wrapper(*args):
        calls.append(1)
        if len(calls) == n:
            raise cli.Terminated()
        return fn(*args)
    return wrapper


def snapshot(directory: Path) -> dict:
    """Every file under `directory` (hidden ones too) with its bytes' hash: compared before and after."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


def python_m(*argv, **kw) -> subprocess.CompletedProcess:
    """`python -m ...` as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "-m", *map(str, argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, **kw)


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command failed with `code`, no traceback, and its last line is the error; returns that line."""
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last
