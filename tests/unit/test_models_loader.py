"""ModelConfig parsing and load_model's errors, on tiny checkpoints written by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from orbit.models.config import ModelConfig
from orbit.models.loader import load_model

TINY = {"vocab_size": 67, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64}


def hf_dict(**kw) -> dict:
    d = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 67,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
    d.update(kw)
    return d


def save_tiny(tmp_path, shard: str | None = None) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    if shard:
        model.save_pretrained(tmp_path, max_shard_size=shard)
    else:
        model.save_pretrained(tmp_path)


def test_config_fields_from_transformers4_and_5_styles() -> None:
    v4 = ModelConfig.from_hf_dict(hf_dict(rope_theta=5e5, rope_scaling={
        "type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, eos_token_id=[1, 2]))
    assert v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.head_dim == 8 and v4.tie_word_embeddings and v4.eos_token_ids == [1, 2]
    v5 = ModelConfig.from_hf_dict(hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert v5.rope_theta == 1e6 and v5.rope_scaling is None
    moe = ModelConfig.from_hf_dict(hf_dict(
        architectures=["Qwen3MoeForCausalLM"], num_local_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, decoder_sparse_step=2, mlp_only_layers=[3], num_hidden_layers=6))
    assert moe.qk_norm and moe.num_experts == 8
    assert [moe.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_config_rejects_unsupported(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(hf_dict(**change))


def test_load_sharded_checkpoint_is_frozen_and_not_meta(tmp_path) -> None:
    save_tiny(tmp_path, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_model(tmp_path, dtype=torch.bfloat16)
    params = list(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and not p.is_meta and not p.requires_grad for _, p in params)
    assert model.model.rotary_emb.cos.shape == (64, 8) and not model.model.rotary_emb.cos.is_meta


def test_missing_shard_is_named(tmp_path) -> None:
    save_tiny(tmp_path, shard="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = max(set(index["weight_map"].values()))
    (tmp_path / victim).unlink()
    with pytest.raises(ValueError, match=victim):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path) -> None:
    save_tiny(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_shape_mismatch_is_named(tmp_path) -> None:
    save_tiny(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\(64, 32\).*\(48, 32\)"):
        load_model(tmp_path)


def test_unexpected_tensor_is_reported(tmp_path) -> None:
    save_tiny(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_proj.bias"):
        load_model(tmp_path)


def test_not_a_model_dir(tmp_path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="neither"):
        load_model(tmp_path / "nope")


def test_quantize_error_starts_with_the_layer_name(tmp_path) -> None:
    save_tiny(tmp_path)  # hidden 32: a group of 48 cannot divide q_proj's in_features
    msg = (r"^model\.layers\.0\.self_attn\.q_proj: cannot quantize its weight \[32, 32\] to "
           r"int8 \(group_size=48.*does not divide in_features 32")
    with pytest.raises(ValueError, match=msg):
        load_model(tmp_path, quant="int8", group_size=48, with_tokenizer=False)


def test_wrong_dtype_is_named(tmp_path) -> None:
    save_tiny(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 64, dtype=torch.int8)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for quant in (None, "int4"):  # cast silently before; on the quantized path, unnamed
        msg = r"'model\.layers\.0\.mlp\.down_proj\.weight' has dtype torch\.int8"
        with pytest.raises(ValueError, match=msg):
            load_model(tmp_path, quant=quant, group_size=32, with_tokenizer=False)
