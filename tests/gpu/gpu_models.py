"""The small random Qwen3 (GQA, QK-norm, sharp LM head) that GPU engine tests share: 3 layers,
hidden 256, 8 query / 4 KV heads of 32, vocabulary 503, EOS id 1; bf16 on CUDA, its linears
converted to `fmt` (bf16: plain nn.Linear)."""

from __future__ import annotations

import torch

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.quant.convert import convert_linears

V = 503


def small_qwen3(fmt: str) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=V, hidden_size=256, intermediate_size=512,
                      num_layers=3, num_heads=8, num_kv_heads=4, head_dim=32, qk_norm=True,
                      max_position_embeddings=2048, eos_token_id=1)
    model = CausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # sharp: greedy paths without near-ties
    model = model.to("cuda", torch.bfloat16).requires_grad_(False)
    model.model.rotary_emb.reset("cuda")
    if fmt != "bf16":
        convert_linears(model, fmt)
    return model
