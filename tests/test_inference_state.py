"""Incremental inference over the fixed-capacity state must equal one full forward."""

import pytest
import torch

from model import CapacityError, InferenceState
from tests.conftest import randomize, small_config
from model import Qwen3NextForCausalLM


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def ids(B, T, seed=0, vocab=101):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(small_model):
    x = ids(2, 40)
    full = small_model(x)
    state = small_model.new_state(2, 64)
    logits = [small_model(x[:, :25], state)]
    logits += [small_model(x[:, t:t + 1], state) for t in range(25, 40)]
    assert rel(torch.cat(logits, 1), full) < 1e-5
    assert state.lengths.tolist() == [40, 40]


@torch.no_grad()
def test_chunked_prefill_equals_one_prefill(small_model):
    x = ids(1, 90, seed=1)
    one = small_model.new_state(1, 128)
    last_one = small_model(x, one, logits_to_keep=1)
    chunked = small_model.new_state(1, 128)
    for a, b in ((0, 17), (17, 18), (18, 70), (70, 90)):  # A then B equals A+B, odd and 1-token chunks too
        last = small_model(x[:, a:b], chunked, logits_to_keep=1)
    assert rel(last, last_one) < 1e-5
    for s1, s2 in zip(one.tensors(), chunked.tensors()):
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_batch_rows_are_independent(small_model):
    x = ids(3, 30, seed=2)
    state = small_model.new_state(3, 48)
    batched = small_model(x, state)
    for b in range(3):
        single = small_model.new_state(1, 48)
        assert rel(small_model(x[b:b + 1], single), batched[b:b + 1]) < 1e-5


@torch.no_grad()
def test_rows_at_different_lengths_decode_together(small_model):
    """Prefill rows separately (through row views of one state), then decode the batch with per-row positions."""
    prompts = [ids(1, n, seed=10 + n) for n in (5, 19, 11)]
    state = small_model.new_state(3, 40)
    for b, p in enumerate(prompts):
        small_model(p, state.rows(b))
    assert state.lengths.tolist() == [5, 19, 11]
    nxt = ids(3, 1, seed=99)
    batched = small_model(nxt, state)
    for b, p in enumerate(prompts):
        full = small_model(torch.cat([p, nxt[b:b + 1]], 1))[:, -1:]
        assert rel(batched[b:b + 1], full) < 1e-5


@torch.no_grad()
def test_clone_forks_and_copy_restores(small_model):
    x = ids(1, 12, seed=3)
    state = small_model.new_state(1, 32)
    small_model(x, state)
    snap = state.clone()
    a = small_model(ids(1, 3, seed=4), state)
    b = small_model(ids(1, 3, seed=5), snap)      # the fork continues independently
    state.copy_(snap.clone())                      # restore the fork's contents into the original buffers
    assert not torch.allclose(a, b)
    assert torch.equal(state.lengths, snap.lengths)


@torch.no_grad()
def test_buffers_are_written_in_place(small_model):
    state = small_model.new_state(2, 16)
    pointers = [t.data_ptr() for t in state.tensors()]
    small_model(ids(2, 9), state)
    small_model(ids(2, 1, seed=1), state)
    assert [t.data_ptr() for t in state.tensors()] == pointers
    assert all(t.abs().sum() > 0 for t in state.tensors())
    rebuilt = InferenceState.from_tensors(small_model.config, state.tensors())
    assert rebuilt.max_seq_len == 16 and rebuilt.names() == state.names()


@torch.no_grad()
def test_running_past_capacity_is_a_clear_error(small_model):
    state = small_model.new_state(1, 10)
    small_model(ids(1, 8), state)
    with pytest.raises(CapacityError, match="capacity of 10"):
        small_model(ids(1, 3), state)
    with pytest.raises(CapacityError, match="batch 2"):
        small_model(ids(2, 1), state)
    with pytest.raises(CapacityError, match="max_position_embeddings"):
        small_model(ids(1, 300))


@torch.no_grad()
def test_bfloat16_state_decodes_close_to_float32():
    model = randomize(Qwen3NextForCausalLM(small_config()), seed=3).eval()
    x = ids(1, 24, seed=6)
    full = model(x)
    bf = Qwen3NextForCausalLM(small_config()).eval()
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    state = bf.new_state(1, 32)
    assert state.layers[0][1].dtype == torch.float32   # recurrent state stays float32
    out = torch.cat([bf(x[:, :16], state)] + [bf(x[:, t:t + 1], state) for t in range(16, 24)], 1)
    assert rel(out.float(), full) < 3e-2
