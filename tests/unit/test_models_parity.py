"""Orbit's CausalLM against transformers on tiny random Llama / Qwen3 / Qwen3-MoE models.

Each test builds the transformers model with random weights, saves it with save_pretrained
(sharded, so the index path is exercised), loads it with orbit's `load_model`, and compares
float32 logits on a packed batch of variable-length sequences; then checks that cached
prefill (incl. a chunked second prefill) + batched decode reproduce the packed logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from orbit.models.attention import (
    AttnBatch,
    KVCache,
    cu_seqlens_from_lengths,
    positions_from_lengths,
)
from orbit.models.loader import load_model

COMMON = {
    "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
    "initializer_range": 0.1, "rms_norm_eps": 1e-5,
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e5}
CASES = {
    "llama_tied_llama3rope_bias": (LlamaForCausalLM, LlamaConfig, {
        "tie_word_embeddings": True, "attention_bias": True, "rope_parameters": LLAMA3_ROPE}),
    "llama_yarn": (LlamaForCausalLM, LlamaConfig, {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 1e4}}),
    "llama_linear": (LlamaForCausalLM, LlamaConfig, {"rope_parameters": {
        "rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"tie_word_embeddings": False}),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "mlp_only_layers": [1]}),
}
LENGTHS = [7, 13, 6]


def build_pair(case: str, tmp_path, seed: int = 0):
    """(transformers model, orbit model) with identical random float32 weights."""
    cls, cfg_cls, extra = CASES[case]
    torch.manual_seed(seed)
    hcfg = cfg_cls(**COMMON, **extra)
    hf = cls(hcfg).eval()
    if case == "qwen3_moe":  # random routers so that routing is not near-uniform
        for layer in hf.model.layers:
            if hasattr(layer.mlp, "gate"):
                torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    model, tok = load_model(tmp_path, dtype=torch.float32)
    assert tok is None  # no tokenizer files in a random model dir
    return hf, model


def packed_inputs(seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, COMMON["vocab_size"], (n,), generator=g) for n in LENGTHS]
    return seqs, torch.cat(seqs)


def orbit_packed_logits(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    lens = [len(s) for s in seqs]
    h = model(torch.cat(seqs), positions_from_lengths(lens), AttnBatch.packed(cu_seqlens_from_lengths(lens)))
    return model.logits(h)


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_packed_logits_match_transformers(case: str, tmp_path) -> None:
    hf, model = build_pair(case, tmp_path)
    seqs, _ = packed_inputs()
    ref = torch.cat([hf(s[None]).logits[0] for s in seqs]).float()
    out = orbit_packed_logits(model, seqs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ref.abs().max() > 0.5  # logits are not vanishingly small, so the tolerance means something
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["llama_tied_llama3rope_bias", "qwen3", "qwen3_moe"])
@torch.no_grad()
def test_cached_prefill_and_decode_match_packed(case: str, tmp_path) -> None:
    _, model = build_pair(case, tmp_path)
    seqs, _ = packed_inputs()
    ref = orbit_packed_logits(model, seqs).split(LENGTHS)
    cfg = model.config
    cache = KVCache.for_model(cfg, num_slots=5, max_len=32, dtype=torch.float32, device="cpu")
    cache.k.normal_()  # stale garbage in unused positions must never be read
    cache.v.normal_()
    slots = torch.tensor([3, 0, 4])
    n_decode = 3
    first = [2, 5, 1]  # prefill in two chunks: [0, first) then [first, n - n_decode)
    second = [n - n_decode - f for n, f in zip(LENGTHS, first)]
    got: list[list[torch.Tensor]] = [[] for _ in seqs]
    for chunk, start in ((first, [0, 0, 0]), (second, first)):
        x = torch.cat([s[a : a + c] for s, a, c in zip(seqs, start, chunk)])
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(start, chunk)])
        batch = AttnBatch.cached(cache, slots, cu_seqlens_from_lengths(chunk), torch.tensor(start))
        for b, lg in enumerate(model.logits(model(x, pos, batch)).split(chunk)):
            got[b].append(lg)
    for step in range(n_decode):
        sp = torch.tensor([n - n_decode + step for n in LENGTHS])
        x = torch.stack([s[p] for s, p in zip(seqs, sp.tolist())])
        batch = AttnBatch.cached(cache, slots, torch.arange(len(seqs) + 1), sp, max_context=20)
        for b, lg in enumerate(model.logits(model(x, sp, batch))):
            got[b].append(lg[None])
    for b in range(len(seqs)):
        torch.testing.assert_close(torch.cat(got[b]), ref[b], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_copy_slot_forks_a_prefilled_prompt(tmp_path) -> None:
    _, model = build_pair("qwen3", tmp_path)
    seqs, _ = packed_inputs()
    s = seqs[1]
    cache = KVCache.for_model(model.config, num_slots=3, max_len=32, dtype=torch.float32, device="cpu")
    n = len(s) - 1
    model(s[:n], torch.arange(n), AttnBatch.cached(cache, torch.tensor([0]), torch.tensor([0, n]), torch.tensor([0])))
    cache.copy_slot(0, 2, n)
    sp = torch.tensor([n, n])
    batch = AttnBatch.cached(cache, torch.tensor([0, 2]), torch.arange(3), sp)
    lg = model.logits(model(torch.stack([s[n], s[n]]), sp, batch))
    ref = orbit_packed_logits(model, [s])[-1]
    torch.testing.assert_close(lg[0], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lg[1], ref, rtol=1e-5, atol=1e-5)


def test_module_names_line_up_with_transformers(tmp_path) -> None:
    hf, model = build_pair("qwen3_moe", tmp_path)
    ours = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "model.layers.0.self_attn.q_proj" in ours
    assert "model.layers.0.mlp.experts.7.down_proj" in ours
    assert "model.layers.0.mlp.gate" in ours and "model.layers.1.mlp.gate_proj" in ours
    hf_linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert hf_linears <= ours  # every transformers linear (PEFT target) exists under the same name
    assert all(not p.requires_grad for p in model.parameters())  # the base is frozen
