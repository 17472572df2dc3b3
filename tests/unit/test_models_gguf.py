"""The embedded SmolLM2-135M-Instruct Q4_1 GGUF: config, exact int4 weights, and logits against
transformers loading the same file (dequantized to float32)."""

from __future__ import annotations

import pytest
import torch

from orbit.assets import default_gguf_path
from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths
from orbit.models.gguf_loader import config_from_gguf, hf_name
from orbit.models.loader import load_model
from orbit.models.tokenizer import chat_prompt_ids, load_tokenizer, stop_token_ids
from orbit.quant.gguf import GGUFReader
from orbit.quant.linear import QuantLinear


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return default_gguf_path()
    except ValueError as e:  # the package is a declared test dependency; say what is missing
        pytest.fail(str(e))


def test_config_from_gguf_metadata(gguf_path) -> None:
    r = GGUFReader(str(gguf_path))
    cfg = config_from_gguf(r, {t.name for t in r.tensors})
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("LlamaForCausalLM", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert abs(cfg.rms_norm_eps - 1e-5) < 1e-10 and cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and cfg.eos_token_id == 2


def test_gguf_names_map_to_hf() -> None:
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None


@pytest.mark.slow
def test_tokenizer_and_chat_template_from_gguf(gguf_path) -> None:
    tok = load_tokenizer(gguf_path)  # transformers' GGUF tokenizer conversion: 3-20 s
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n"), text
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert stop_token_ids(tok, [2]) == [2] and tok.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_logits_match_transformers(gguf_path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_model(gguf_path, dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.weight_format == "int4" and q.group_size == 32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, dense float
    ids = torch.tensor(chat_prompt_ids(tok, [{"role": "user", "content": "What is 7 times 6?"}]))
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    # Same values: transformers' dequantized (and un-permuted) weights equal Orbit's int4 ones.
    torch.testing.assert_close(q.dequantize(), hf.model.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
        out = model.logits(model(ids, torch.arange(len(ids)), AttnBatch.packed(cu_seqlens_from_lengths([len(ids)]))))
    # Identical weights in float32; only matmul reduction order differs (observed ~1e-5).
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
