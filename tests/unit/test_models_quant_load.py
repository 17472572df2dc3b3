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


def _ct_llama(path, edit=None, symmetric_cfg: bool = True, asym: bool = False) -> None:
    """A tiny biased Llama (transformers) rewritten as a compressed-tensors INT4 checkpoint;
    `edit(tensors)` changes the tensor dict before it is saved."""
    import pytest

    tr = pytest.importorskip("transformers")
    src = path.parent / (path.name + "-src")
    torch.manual_seed(0)
    tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=67, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        attention_bias=True)).save_pretrained(src)
    out = {}
    for k, t in load_file(src / "model.safetensors").items():
        m = k.removesuffix(".weight")
        if k.endswith(".weight") and any(re.fullmatch(p, m) for p in DEFAULT_QUANT_TARGETS):
            out.update(write_linear(quantize(t, "int4", group_size=32, symmetric=not asym), m,
                                    "compressed-tensors"))
        else:
            out[k] = t
    if edit is not None:
        edit(out)
    path.mkdir()
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config("compressed-tensors", "int4", group_size=32,
                                                     symmetric=symmetric_cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_prequantized_checkpoint_biases_are_checked(tmp_path) -> None:
    """A quantized linear's bias is read, cast to the compute dtype, and a missing one (the
    config says attention_bias) is a named error, as for float checkpoints."""
    import pytest

    ok = tmp_path / "ok"
    _ct_llama(ok)
    model, _ = load_model(ok, dtype=torch.float32, with_tokenizer=False)
    q = model.model.layers[0].self_attn.q_proj
    stored = load_file(ok / "model.safetensors")
    assert isinstance(q, QuantLinear) and q.bias is not None and q.bias.dtype == torch.float32
    assert torch.equal(q.bias, stored["model.layers.0.self_attn.q_proj.bias"].float())
    # the compute dtype reaches the bias only: the scales stay as stored
    assert q.scale.dtype == stored["model.layers.0.self_attn.q_proj.weight_scale"].dtype
    gone = tmp_path / "gone"
    _ct_llama(gone, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_model(gone, dtype=torch.float32, with_tokenizer=False)


def test_zero_points_under_a_symmetric_config_are_an_error(tmp_path) -> None:
    import pytest

    bad = tmp_path / "bad"
    _ct_llama(bad, asym=True, symmetric_cfg=True)
    with pytest.raises(ValueError, match="weight_zero_point' is present but the quantization_config "
                                         "says symmetric"):
        load_model(bad, dtype=torch.float32, with_tokenizer=False)
    good = tmp_path / "good"
    _ct_llama(good, asym=True, symmetric_cfg=False)
    model, _ = load_model(good, dtype=torch.float32, with_tokenizer=False)
    assert "offset" in dict(model.model.layers[0].self_attn.q_proj.named_buffers())


def test_truncated_safetensors_names_the_file(tmp_path) -> None:
    import pytest

    path = tmp_path / "cut"
    _ct_llama(path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(path, dtype=torch.float32, with_tokenizer=False)
