"""Our model against transformers' Qwen3NextForCausalLM on the same random weights, both load directions."""

import json

import pytest
import torch

from model import Qwen3NextForCausalLM
from tests.conftest import randomize, small_config

transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (dev extra)")

CONFIGS = {
    "dense": {},
    "gva-3x": dict(linear_num_key_heads=2, linear_num_value_heads=6, linear_value_head_dim=12),
    "moe-shared": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40),
    "moe-sparse-step": dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=16, decoder_sparse_step=2,
                            mlp_only_layers=[3], norm_topk_prob=False),
    "partial-rotary-half": dict(partial_rotary_factor=0.5, rope_theta=50000.0),
    "odd-sizes": dict(vocab_size=103, hidden_size=72, intermediate_size=100, num_hidden_layers=5, head_dim=24,
                      num_attention_heads=3, num_key_value_heads=1, linear_key_head_dim=12,
                      linear_value_head_dim=20, linear_num_key_heads=3, linear_num_value_heads=6,
                      linear_conv_kernel_dim=3),
    "tied-interval-2": dict(tie_word_embeddings=True, num_hidden_layers=4,
                            layer_types=["linear_attention", "full_attention"] * 2),
}


def hf_config(config):
    d = {k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type")}
    return transformers.Qwen3NextConfig(**d)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_checkpoint_loads_and_matches(name, tmp_path):
    config = small_config(**CONFIGS[name])
    torch.manual_seed(1)
    hf = randomize(transformers.Qwen3NextForCausalLM(hf_config(config)), seed=2).eval()
    hf.save_pretrained(tmp_path)
    ours = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    assert got.shape == (2, 37, config.vocab_size)
    assert rel(got, expected) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_our_checkpoint_loads_in_transformers_and_matches(name, tmp_path):
    config = small_config(**CONFIGS[name])
    ours = randomize(Qwen3NextForCausalLM(config), seed=4).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.Qwen3NextForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (3, 29), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(ours(ids), hf(ids).logits) < 1e-4


def test_state_dict_moves_across_unchanged():
    config = small_config(**CONFIGS["moe-shared"])
    ours = randomize(Qwen3NextForCausalLM(config), seed=6).eval()
    hf = transformers.Qwen3NextForCausalLM(hf_config(config)).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(ours(ids), hf(ids).logits) < 1e-4


def test_transformers_4x_config_layout_loads(tmp_path):
    """transformers 4.x wrote rope_theta / partial_rotary_factor at top level and no rope_parameters."""
    config = small_config(partial_rotary_factor=0.5, rope_theta=20000.0)
    ours = randomize(Qwen3NextForCausalLM(config), seed=8).eval()
    ours.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope["partial_rotary_factor"],
             rope_scaling=None, eos_token_id=[0])
    (tmp_path / "config.json").write_text(json.dumps(d))
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.rope_theta == 20000.0 and loaded.config.partial_rotary_factor == 0.5
    ids = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours(ids))
