"""Orbit adapters export as PEFT directories that the real `peft` loads with identical logits.

A tiny random Llama / Qwen3 gets Orbit LoRA or OFT with random nonzero values; the saved
directory goes through `PeftModel.from_pretrained` onto a fresh copy of the same base, and
the float32 logits must agree. Bad files must fail with a ValueError naming what mismatches.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from orbit.adapters import AdapterConfig, inject_adapters

VOCAB = 101


def tiny_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw)).eval()


def randomize(aset, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


CASES = [
    ("llama", dict(kind="lora", r=4, alpha=8.0)),
    (
        "qwen3",
        dict(
            kind="lora", r=8, alpha=4.0, use_rslora=True, targets=("q_proj", "v_proj", "down_proj")
        ),
    ),
    ("llama", dict(kind="oft", block_size=16)),
    ("qwen3", dict(kind="oft", block_size=8, cayley_neumann=False)),
    ("llama", dict(kind="oft", block_size=16, num_terms=3)),
    ("qwen3", dict(kind="oft", r=4, block_size=0, block_share=True)),
    # A regex target: only layer 1's attention output -> exported as an exact-path regex.
    (
        "llama",
        dict(kind="lora", r=2, alpha=2.0, targets=(r"re:model\.layers\.1\.self_attn\.o_proj",)),
    ),
]


@pytest.mark.parametrize("arch,kw", CASES)
def test_peft_loads_orbit_adapter_with_same_logits(tmp_path, arch, kw):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    aset = inject_adapters(model, AdapterConfig(dtype=torch.float32, **kw))
    randomize(aset)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    ours = logits(model, ids)
    ref_base = logits(base, ids)
    assert (ours - ref_base).abs().max() > 1e-3, "adapter did not change the logits"

    aset.save_peft(tmp_path / "ad", base_model_name_or_path="tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. peft's "missing keys" warning
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    n_wrapped = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".base_layer"))
    assert n_wrapped == len(aset.modules)
    theirs = logits(peft_model, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # And back: a fresh Orbit injection loads the same directory to the same logits.
    model2 = copy.deepcopy(base)
    aset2 = inject_adapters(model2, AdapterConfig(dtype=torch.float32, **kw))
    aset2.load_peft(tmp_path / "ad")
    torch.testing.assert_close(logits(model2, ids), ours, rtol=0, atol=0)


def test_peft_keys_and_config(tmp_path):
    model = tiny_model("llama")
    aset = inject_adapters(model, AdapterConfig(kind="oft", block_size=16))
    aset.save_peft(tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.mlp.down_proj.oft_R.weight"
    assert tensors[key].shape == (96 // 16, 16 * 15 // 2) and tensors[key].dtype == torch.bfloat16
    assert not any(".base." in k for k in tensors)
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "OFT" and conf["oft_block_size"] == 16 and conf["r"] == 0
    assert sorted(conf["target_modules"]) == sorted(AdapterConfig().targets)


def test_save_overwrites_atomically(tmp_path):
    model = tiny_model("llama")
    aset = inject_adapters(model, AdapterConfig(kind="lora", r=2))
    aset.save_peft(tmp_path / "ad")
    randomize(aset)
    aset.save_peft(tmp_path / "ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no tmp/old dirs left behind
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    for k, v in aset.state_dict_peft().items():
        assert torch.equal(saved[k], v)


def _saved(tmp_path, **kw):
    model = tiny_model("llama")
    aset = inject_adapters(model, AdapterConfig(**kw))
    aset.save_peft(tmp_path / "ad")
    return tmp_path / "ad"


def test_load_rejects_rank_mismatch(tmp_path):
    d = _saved(tmp_path, kind="lora", r=4)
    other = inject_adapters(tiny_model("llama"), AdapterConfig(kind="lora", r=8))
    with pytest.raises(ValueError, match=r"r: file has 4, model has 8") as e:
        other.load_peft(d)
    assert "shape of base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in str(e.value)


def test_load_rejects_other_targets_and_kind(tmp_path):
    d = _saved(tmp_path, kind="lora", r=4, targets=("q_proj",))
    other = inject_adapters(
        tiny_model("llama"), AdapterConfig(kind="lora", r=4, targets=("q_proj", "k_proj"))
    )
    with pytest.raises(
        ValueError,
        match=r"missing key base_model\.model\.model\.layers\.1\.self_attn\.k_proj\.lora_A",
    ):
        other.load_peft(d)
    oft = inject_adapters(tiny_model("llama"), AdapterConfig(kind="oft", targets=("q_proj",)))
    with pytest.raises(ValueError, match="peft_type: file has 'LORA'"):
        oft.load_peft(d)


def test_load_rejects_bad_tensors(tmp_path):
    d = _saved(tmp_path, kind="lora", r=4, targets=("q_proj",))
    tensors = load_file(str(d / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(3, 4)
    tensors["base_model.model.model.layers.0.mlp.nope.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    aset = inject_adapters(
        tiny_model("llama"), AdapterConfig(kind="lora", r=4, targets=("q_proj",))
    )
    with pytest.raises(ValueError) as e:
        aset.load_peft(d)
    msg = str(e.value)
    assert "shape of base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in msg
    assert "unexpected key base_model.model.model.layers.0.mlp.nope.lora_A.weight" in msg


def test_load_rejects_non_peft_dirs(tmp_path):
    aset = inject_adapters(tiny_model("llama"), AdapterConfig(kind="lora", r=4))
    with pytest.raises(ValueError, match="not a PEFT adapter dir"):
        aset.load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file({"x": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="no peft_type"):
        aset.load_peft(tmp_path)
