"""The small random Qwen3 (GQA, QK-norm, sharp LM head) that GPU engine tests share: 3 layers,
8 query heads of 32, vocabulary 503, EOS id 1, seed 0; on CUDA in `dtype` (RoPE tables
float32), its linears converted to `fmt` (None: plain nn.Linear)."""

from __future__ import annotations

import torch

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.quant.convert import convert_linears

V = 503


def small_qwen3(fmt: str | None = None, dtype: torch.dtype = torch.bfloat16, hidden: int = 256,
                kv_heads: int = 4, device: str = "cuda") -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=V, hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=3, num_heads=8,
                      num_kv_heads=kv_heads, head_dim=32, qk_norm=True,
                      max_position_embeddings=2048, eos_token_id=1)
    model = CausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked distributions: no near-ties between paths
    model = model.to(device, dtype).requires_grad_(False)
    model.model.rotary_emb.reset(device)  # keep the RoPE tables float32
    if fmt not in (None, "bf16"):
        convert_linears(model, fmt)
    return model
