"""The tiny random Qwen3 (GQA, QK-norm) that the CPU engine tests share: 2 layers, hidden 64,
4 query / 2 KV heads of 16, vocabulary 97, EOS id 5."""

from __future__ import annotations

import torch

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM

VOCAB = 97


def tiny_qwen3(lm_scale: float = 1.0, seed: int = 0, max_positions: int = 256) -> CausalLM:
    """A fresh model in eval mode; `lm_scale` multiplies the LM head, which sharpens the
    sampled distributions (fewer near-ties between two paths that should agree)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                      max_position_embeddings=max_positions, eos_token_id=5)
    m = CausalLM(cfg).eval()
    if lm_scale != 1.0:
        with torch.no_grad():
            m.lm_head.weight.mul_(lm_scale)
    return m


def with_active_lora(model: CausalLM, dtype: torch.dtype, r: int = 8):
    """Inject LoRA (r, alpha 2r) on every linear of `model`, give every B random entries (PEFT
    starts B at zero: no effect), stage it into slot 1 and serve that slot; returns the
    AdapterSet."""
    from orbit.adapters.inject import AdapterConfig, inject_adapters

    aset = inject_adapters(model, AdapterConfig(r=r, alpha=2.0 * r, dtype=dtype))
    with torch.no_grad():
        for mod in aset.modules.values():
            mod.lora_B.normal_(0, 0.5)
    aset.stage(0, 1)
    aset.set_active(1)
    return aset


def tiny_int4_decoder(adapter: bool = False, seed: int = 9) -> CausalLM:
    """tiny_qwen3 in bf16 with INT4 (group 32) linears, q/k/v and gate/up stacked as the
    engine stacks them (fuse_siblings); with `adapter`, an active LoRA on every linear and the
    decode groups linked (the engine's decode-time layout, for the launch-folding tests)."""
    from orbit.adapters.lora_decode import link_lora_decode
    from orbit.quant.convert import convert_linears
    from orbit.quant.siblings import fuse_siblings

    model = tiny_qwen3(seed=seed).to(torch.bfloat16)
    convert_linears(model, "int4", group_size=32, cache_dequantized=False)
    fuse_siblings(model)
    if adapter:
        with_active_lora(model, torch.bfloat16)
        link_lora_decode(model)
    return model
