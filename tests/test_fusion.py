"""model/fusion.py: the exported copy with stacked projections computes what the model computes, and leaves the
model itself as it was."""

import pytest
import torch
from torch import nn

from model import Qwen3NextForCausalLM
from model.fusion import FusedLinear, fuse_projections
from tests.conftest import randomize, small_config

# Every fusible module: DeltaNet and attention layers (with biases), a dense MLP and an MoE block's shared expert.
CONFIG = dict(layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              attention_bias=True, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=24, mlp_only_layers=[0, 3])


@pytest.fixture(scope="module")
def models():
    model = randomize(Qwen3NextForCausalLM(small_config(**CONFIG)), seed=5).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, fuse_projections(model), before


def test_fused_copy_computes_the_same_logits(models):
    model, fused, _ = models
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (3, 11), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fused(prompt), model(prompt), rtol=0, atol=1e-12)
        mine, theirs = fused.new_state(3, 32), model.new_state(3, 32)
        torch.testing.assert_close(fused(prompt, mine), model(prompt, theirs), rtol=0, atol=1e-12)
        for _ in range(4):
            ids = torch.randint(0, model.config.vocab_size, (3, 1), generator=g)
            torch.testing.assert_close(fused(ids, mine), model(ids, theirs), rtol=0, atol=1e-12)
        for a, b in zip(mine.tensors(), theirs.tensors()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_every_shared_input_projection_is_one_product(models):
    model, fused, _ = models
    groups = [m for m in fused.modules() if isinstance(m, FusedLinear)]
    # 2 DeltaNet (qkvz+ba), 2 attention (q+k+v), 2 dense MLPs and 2 shared experts (gate+up), and the LM head.
    assert len(groups) == 9
    names = {name.rsplit(".", 2)[-2] for name, _ in fused.named_parameters()}
    assert not names & {"in_proj_qkvz", "in_proj_ba", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    attn = model.model.layers[1].self_attn
    torch.testing.assert_close(fused.model.layers[1].mixer.fused.bias,
                               torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), rtol=0, atol=0)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters())


def test_model_unchanged_and_other_weights_shared(models):
    model, fused, before = models
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    mine = dict(fused.named_parameters())
    assert mine["model.layers.0.mixer_output.weight"] is model.model.layers[0].linear_attn.out_proj.weight
    assert mine["model.layers.0.mixer.fused.norm.weight"] is model.model.layers[0].input_layernorm.weight
    assert mine["lm_head.norm.weight"] is model.model.norm.weight
    assert mine["model.embed_tokens.weight"] is model.model.embed_tokens.weight


def test_layers_with_and_without_bias_are_refused():
    with pytest.raises(ValueError, match="only some have a bias"):
        FusedLinear([nn.Linear(4, 3), nn.Linear(4, 2, bias=False)])
