"""Adapters on a quantized base (QuantLinear) export to PEFT that loads onto transformers with
the dequantized weights, and merging folds an adapter into a BF16/float copy of the base
weight that reproduces the adapted model without any adapter code."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from orbit.adapters import AdapterConfig, LoRALinear, OFTLinear, inject_adapters
from orbit.adapters.merge import merged_state_dict, merged_weight
from orbit.quant.convert import convert_linears
from orbit.quant.linear import QuantLinear

VOCAB = 89


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def dequantized_copy(qmodel: nn.Module) -> nn.Module:
    """The same model with every QuantLinear replaced by an nn.Linear of its dequantized weight."""
    model = copy.deepcopy(qmodel)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
    return model


def randomize(aset) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


KINDS = [dict(kind="lora", r=4, alpha=8.0), dict(kind="oft", block_size=16, cayley_neumann=False)]


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
@pytest.mark.parametrize("kw", KINDS)
def test_quantized_base_adapter_loads_in_peft(tmp_path, fmt, kw):
    qbase = tiny_llama()
    group = 32 if fmt == "int4" else None
    assert convert_linears(qbase, fmt, targets=("*.self_attn.*", "*.mlp.*"), group_size=group) == 14
    ref_base = dequantized_copy(qbase)
    model = copy.deepcopy(qbase)
    aset = inject_adapters(model, AdapterConfig(dtype=torch.float32, **kw))
    assert isinstance(model.model.layers[0].mlp.up_proj.base, QuantLinear)
    randomize(aset)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = logits(model, ids)
    with aset.adapter_disabled():
        assert torch.equal(logits(model, ids), logits(qbase, ids))
    aset.save_peft(tmp_path / "ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pm = PeftModel.from_pretrained(ref_base, str(tmp_path / "ad")).eval()
    torch.testing.assert_close(ours, logits(pm, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", KINDS)
@pytest.mark.parametrize("quant", [False, True])
def test_merged_weights_reproduce_adapted_model(kw, quant):
    base = tiny_llama()
    if quant:
        convert_linears(base, "int4", targets=("*.self_attn.*", "*.mlp.*"), group_size=32)
    model = copy.deepcopy(base)
    aset = inject_adapters(model, AdapterConfig(dtype=torch.float32, **kw))
    randomize(aset)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    want = logits(model, ids)
    merged = dequantized_copy(base)
    sd = merged_state_dict(aset, dtype=torch.float32)
    assert len(sd) == len(aset.modules)
    _, unexpected = merged.load_state_dict(sd, strict=False)
    assert not unexpected
    got = logits(merged, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - logits(dequantized_copy(base), ids)).abs().max() > 1e-3


def test_merged_weight_formulas():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    lora = LoRALinear(lin, r=4, alpha=4, dtype=torch.float32)
    oft = OFTLinear(nn.Linear(32, 16), block_size=8, dtype=torch.float32)
    with torch.no_grad():
        lora.lora_B.normal_()
        oft.oft_R.normal_(0, 0.1)
    x = torch.randn(3, 32)
    for m in (lora, oft):
        w = merged_weight(m, dtype=torch.float32)
        torch.testing.assert_close(x @ w.T + m.base.bias, m(x), rtol=1e-5, atol=1e-5)
    assert merged_weight(lora).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="cannot merge"):
        merged_weight(lin)  # type: ignore[arg-type]
