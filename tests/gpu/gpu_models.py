"""The small random Qwen3 (GQA, QK-norm, sharp LM head) that GPU engine tests share: 3 layers,
8 query heads of 32, vocabulary 503, EOS id 1, seed 0; on CUDA in `dtype` (RoPE tables
float32), its linears converted to `fmt` (None: plain nn.Linear)."""

from __future__ import annotations

import torch

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.quant.convert import convert_linears
from orbit.rollout.engine import Engine

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


def mixed_prompts(seed: int) -> list[list[int]]:
    """Four prompts of 37, 120, 5 and 260 random tokens (short, long, tiny, past 256)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (int(n),), generator=g).tolist() for n in (37, 120, 5, 260)]


def run_engine(model: CausalLM, prompts: list[list[int]], sp, batch: int,
               **engine_kw) -> tuple[Engine, list]:
    """(engine, completions) of prompts[:batch] from a fresh triton-backend Engine with
    max_num_seqs=batch and `engine_kw`, graphs on; its KV cache is released after."""
    eng = Engine(model, max_num_seqs=batch, max_model_len=512, attn_backend="triton", **engine_kw)
    out = [c for row in eng.generate(prompts[:batch], sp) for c in row]
    eng.release_kv_cache()
    return eng, out


def bits(completions: list) -> list[tuple[list[int], list[float]]]:
    """Tokens and log-probs of each completion, for bitwise comparisons."""
    return [(c.tokens, c.logprobs) for c in completions]


def engine_on_off(fmt: str, flag: str, batch: int, prompt_seed: int,
                  on_value: object = True) -> tuple[list, list]:
    """(completions with Engine(flag=on_value), with flag=False) of the small `fmt` Qwen3 on
    `batch` mixed prompts, sampling on (seeded), EOS ignored: for a launch option that must
    not change what the engine samples."""
    from orbit.rollout.types import SamplingParams

    model = small_qwen3(fmt)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=3)
    ps = mixed_prompts(prompt_seed)
    _, off = run_engine(model, ps, sp, batch, **{flag: False})
    _, on = run_engine(model, ps, sp, batch, **{flag: on_value})
    return on, off
