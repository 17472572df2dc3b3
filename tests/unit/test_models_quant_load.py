"""Loading with on-the-fly quantization and from a pre-quantized (compressed-tensors) checkpoint."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.loader import DEFAULT_QUANT_TARGETS, load_model
from orbit.quant.checkpoint import write_linear
from orbit.quant.linear import QuantLinear
from orbit.quant.qconfig import quantization_config
from orbit.quant.quantize import quantize

LENGTHS = [5, 8]


def save_tiny_moe(path) -> None:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=71, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         max_position_embeddings=64, initializer_range=0.1, mlp_only_layers=[1])
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)


def logits(model) -> torch.Tensor:
    ids = torch.arange(sum(LENGTHS)) % 71
    attn = AttnBatch.packed(cu_seqlens_from_lengths(LENGTHS))
    with torch.no_grad():
        return model.logits(model(ids, positions_from_lengths(LENGTHS), attn))


def test_int4_on_the_fly_matches_dequantized_reference(tmp_path) -> None:
    save_tiny_moe(tmp_path)
    q_model, _ = load_model(tmp_path, dtype=torch.float32, quant="int4", group_size=32, symmetric=False)
    ref, _ = load_model(tmp_path, dtype=torch.float32)
    pats = [re.compile(p) for p in DEFAULT_QUANT_TARGETS]
    n_quant = 0
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, torch.nn.Linear) and any(p.fullmatch(name) for p in pats):
            qmod = q_model.get_submodule(name)
            assert isinstance(qmod, QuantLinear) and qmod.weight_format == "int4"
            w = quantize(mod.weight.detach(), "int4", group_size=32, symmetric=False).dequantize()
            mod.weight.data.copy_(w)
            n_quant += 1
    assert n_quant == 2 * 4 + 4 * 3 + 3  # attention in both layers, experts of layer 0, dense mlp of layer 1
    assert isinstance(q_model.lm_head, torch.nn.Linear)  # not a target
    assert isinstance(q_model.model.layers[0].mlp.gate, torch.nn.Linear)  # router stays dense
    torch.testing.assert_close(logits(q_model), logits(ref), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(q_model), logits(load_model(tmp_path, dtype=torch.float32)[0]), atol=1e-4)


def test_prequantized_compressed_tensors_checkpoint_loads_exactly(tmp_path) -> None:
    src, dst = tmp_path / "src", tmp_path / "ct"
    save_tiny_moe(src)
    sd = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and any(re.fullmatch(p, mod) for p in DEFAULT_QUANT_TARGETS):
            out.update(write_linear(quantize(t, "int4", group_size=32), mod, "compressed-tensors"))
        else:
            out[name] = t
    dst.mkdir()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config(
        "compressed-tensors", "int4", group_size=32, ignore=["lm_head", "re:.*mlp\\.gate$"])
    (dst / "config.json").write_text(json.dumps(cfg))

    ct_model, _ = load_model(dst, dtype=torch.float32)
    fly_model, _ = load_model(src, dtype=torch.float32, quant="int4", group_size=32)
    q = ct_model.model.layers[0].mlp.experts[3].down_proj
    assert isinstance(q, QuantLinear)
    assert torch.equal(q.dequantize(), fly_model.model.layers[0].mlp.experts[3].down_proj.dequantize())
    assert torch.equal(logits(ct_model), logits(fly_model))
