"""HF-format checkpoints: round trips, sharded indexes, and clear errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, ConfigError, Qwen3NextConfig, Qwen3NextForCausalLM
from model.checkpoint import WEIGHTS, read_safetensors, unstack_experts
from model.tokenizer import Tokenizer
from tests.conftest import randomize, small_config


def saved(tmp_path, **overrides):
    model = randomize(Qwen3NextForCausalLM(small_config(**overrides)), seed=1).eval()
    model.save_pretrained(tmp_path)
    return model


def test_round_trip_in_another_dtype(tmp_path):
    model = saved(tmp_path, num_experts=3, num_experts_per_tok=1, moe_intermediate_size=8)
    keys = set(read_safetensors(tmp_path))
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in keys        # per-expert on disk
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    bf16 = Qwen3NextForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_sharded_index_loads(tmp_path):
    model = saved(tmp_path)
    tensors = unstack_experts({k: v.contiguous() for k, v in model.state_dict().items()})
    (tmp_path / WEIGHTS).unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = Qwen3NextForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing; the checkpoint download is incomplete"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.json not found"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)
    small_config().save(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)


def test_corrupt_files_are_named(tmp_path):
    saved(tmp_path)
    data = (tmp_path / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path):
    saved(tmp_path)
    small_config(hidden_size=48).save(tmp_path)
    with pytest.raises(CheckpointError, match="disagree.*hidden|disagree"):
        Qwen3NextForCausalLM.from_pretrained(tmp_path)


def test_invalid_configs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="multiple of linear_num_key_heads"):
        small_config(linear_num_value_heads=5)
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        small_config(layer_types=["linear_attention"] * 3)
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        Qwen3NextConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ConfigError, match="eos_token_id=500 is outside"):
        small_config(eos_token_id=500)


@pytest.mark.parametrize("fields,problem", [
    ({"num_attention_heads": 0}, "num_attention_heads must be at least 1"),
    ({"linear_num_key_heads": 0}, "linear_num_key_heads must be at least 1"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers should be a whole number, got '4'"),
    ({"hidden_size": 64.0}, "hidden_size should be a whole number"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings should be true or false"),
    ({"layer_types": "linear_attention"}, "layer_types should be a list of strings or null"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be > 0"),
    ({"num_experts": 4, "moe_intermediate_size": 0}, "moe_intermediate_size must be at least 1"),
    ({"mlp_only_layers": [7]}, r"mlp_only_layers \[7\] are not layer indices"),
    ({"rope_parameters": "default"}, "rope_parameters should be an object"),
])
def test_config_json_of_the_wrong_shape_is_named(tmp_path, fields, problem):
    (tmp_path / "config.json").write_text(json.dumps({**small_config().to_dict(), **fields}))
    with pytest.raises(ConfigError, match=problem):
        Qwen3NextConfig.load(tmp_path)


def test_config_json_must_be_an_object_and_unknown_keys_are_ignored(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object of fields, got list"):
        Qwen3NextConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**small_config().to_dict(), "transformers_version": "5.0"}))
    assert Qwen3NextConfig.load(tmp_path) == small_config()


def test_preset_overrides_name_an_unknown_field():
    from model import preset
    with pytest.raises(ConfigError, match="unknown model config field 'num_layers'; did you mean 'num_hidden_layers'"):
        preset("tiny", num_layers=2)


def test_mtp_weights_are_ignored(tmp_path):
    model = saved(tmp_path)
    tensors = read_safetensors(tmp_path)
    tensors["mtp.fc.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / WEIGHTS))
    assert torch.equal(Qwen3NextForCausalLM.from_pretrained(tmp_path).lm_head.weight, model.lm_head.weight)


def test_tokenizer_larger_than_model_vocab(tmp_path):
    tok = Tokenizer.train(["some text for a tokenizer " * 20, "def f(x): return x + 1\n" * 20], vocab_size=300)
    assert tok.vocab_size > 101
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but the model's vocab_size is 101"):
        tok.check_fits(small_config().vocab_size)


def test_saving_over_a_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint loadable and no temp files behind."""
    model = saved(tmp_path)
    import model.checkpoint as ckpt

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", WEIGHTS]
    Qwen3NextForCausalLM.from_pretrained(tmp_path)
