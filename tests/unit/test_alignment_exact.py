"""Exact mode on CPU: the reference kernels agree with plain torch, convert_exact swaps what it
should and reverts cleanly, and the engine's log-probs equal the trainer's bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orbit.alignment.exact import (
    ExactLinear,
    ExactLoRALinear,
    ExactRMSNorm,
    convert_exact,
    exact_mode_summary,
    is_exact,
    revert_exact,
)
from orbit.alignment.measure import measure_mismatch, random_prompts
from orbit.alignment.variants import build_variant, random_model
from orbit.kernels.attention_exact import (
    attention_cached_exact,
    attention_exact_reference,
    attention_packed_exact,
)
from orbit.kernels.matmul_exact import exact_linear, matmul_exact_reference
from orbit.kernels.rmsnorm_exact import rmsnorm_exact_reference
from orbit.models.config import ModelConfig
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

CFG = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                  max_position_embeddings=256)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_matmul_reference_matches_linear_and_grads() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 40, generator=g).requires_grad_()
    w = torch.randn(24, 40, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    y = exact_linear(x, w, b)
    ref = torch.nn.functional.linear(x, w, b)
    assert rel(y, ref) < 1e-6
    y.square().sum().backward()
    gx, gw, gb = x.grad.clone(), w.grad.clone(), b.grad.clone()
    x.grad = w.grad = b.grad = None
    ref.square().sum().backward()
    for got, want in [(gx, x.grad), (gw, w.grad), (gb, b.grad)]:
        assert rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="in_features"):
        matmul_exact_reference(torch.randn(3, 5), torch.randn(4, 6))


def test_matmul_reference_rows_do_not_depend_on_batch() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 80, generator=g).bfloat16()
    x = torch.randn(300, 80, generator=g).bfloat16()
    full = matmul_exact_reference(x, w)
    for i in (0, 7, 299):
        assert torch.equal(matmul_exact_reference(x[i : i + 1], w)[0], full[i])
    assert torch.equal(matmul_exact_reference(x[:7], w), full[:7])


def test_rmsnorm_reference_matches_formula() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 3, 32, generator=g)
    w = torch.rand(32, generator=g) + 0.5
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert rel(rmsnorm_exact_reference(x, w, 1e-6), w * h) < 1e-6


def test_attention_reference_packed_equals_cached_and_sdpa() -> None:
    g = torch.Generator().manual_seed(3)
    lens, H, Hkv, D = [5, 1, 9], 4, 2, 16
    T = sum(lens)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    out = attention_packed_exact(q, k, v, cu, max(lens))
    # SDPA on one sequence (GQA by repeating KV heads)
    a, e = 6, 15
    sd = torch.nn.functional.scaled_dot_product_attention(
        q[a:e].transpose(0, 1), k[a:e].repeat_interleave(2, 1).transpose(0, 1),
        v[a:e].repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    assert rel(out[a:e], sd) < 1e-5
    # the same tokens decoded one at a time from a cache (other slots hold garbage)
    kc, vc = torch.randn(3, 12, Hkv, D, generator=g), torch.randn(3, 12, Hkv, D, generator=g)
    kc[1, :9], vc[1, :9] = k[a:e], v[a:e]
    for t in range(9):
        o = attention_cached_exact(q[a + t : a + t + 1], kc, vc, torch.tensor([0, 1], dtype=torch.int32),
                                   torch.tensor([1]), torch.tensor([t]), 1)
        assert torch.equal(o[0], out[a + t])
    with pytest.raises(ValueError, match="multiple"):
        attention_exact_reference(torch.randn(2, 3, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.arange(2))


def test_convert_exact_swaps_and_reverts() -> None:
    base = random_model(CFG, "cpu", torch.float32)
    model, _ = build_variant(base, "bf16", "lora", "fast")
    before = {n: p.clone() for n, p in model.named_parameters()}
    counts = convert_exact(model)
    assert is_exact(model)
    assert counts["lora"] == 7 * CFG.num_layers and counts["linear"] == counts["lora"] + 1  # + lm_head
    assert counts["rmsnorm"] == CFG.num_layers * 4 + 1  # input/post norms, q/k norms, final
    assert exact_mode_summary(model)["batch_variant_modules"] == []
    assert isinstance(model.lm_head, ExactLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, ExactLoRALinear)
    assert isinstance(model.model.norm, ExactRMSNorm)
    assert convert_exact(model) == counts  # idempotent
    revert_exact(model)
    assert not is_exact(model)
    assert type(model.lm_head) is nn.Linear
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match="CausalLM"):
        convert_exact(nn.Linear(2, 2))


def test_exact_forward_close_to_fast() -> None:
    base = random_model(CFG, "cpu", torch.float32)
    fast, _ = build_variant(base, "bf16", "oft", "fast")
    exact, _ = build_variant(base, "bf16", "oft", "exact")
    from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths

    lens = [7, 3]
    ids = torch.randint(0, CFG.vocab_size, (sum(lens),))
    with torch.no_grad():
        hf = fast(ids, positions_from_lengths(lens), AttnBatch.packed(cu_seqlens_from_lengths(lens)))
        he = exact(ids, positions_from_lengths(lens), AttnBatch.packed(cu_seqlens_from_lengths(lens)))
    assert rel(he, hf) < 1e-3


@pytest.mark.parametrize("precision,adapter", [("bf16", "lora"), ("int4", "oft"), ("nvfp4", "none")])
def test_exact_mode_engine_equals_trainer_on_cpu(precision: str, adapter: str) -> None:
    base = random_model(CFG, "cpu", torch.float32, seed=4)
    model, _ = build_variant(base, precision, adapter, "exact", group_size=32)
    engine = Engine(model, max_num_seqs=6, max_model_len=96)
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3, ignore_eos=True)
    res = measure_mismatch(model, engine, random_prompts(2, CFG.vocab_size, seed=5), sp, n=2)
    m = res.metrics
    assert m.n_tokens == 2 * 2 * 8
    assert m.frac_diff == 0.0 and m.max_abs == 0.0 and m.kl_k3 == 0.0
    assert all(math.isfinite(x) and x <= 0 for row in res.train_logprobs for x in row)


def test_exact_mode_trains_like_fast_mode() -> None:
    """Gradients reach every adapter (through exact attention, norms and matmuls) and agree
    with fast mode's."""
    from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
    from orbit.models.logprobs import token_logprobs

    base = random_model(CFG, "cpu", torch.float32, seed=6)
    lens = [9, 4]
    ids = torch.randint(0, CFG.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("fast", "exact"):
        model, aset = build_variant(base, "bf16", "lora", mode)
        h = model(ids, positions_from_lengths(lens), AttnBatch.packed(cu_seqlens_from_lengths(lens)))
        (-token_logprobs(model, h, torch.roll(ids, -1)).sum()).backward()
        grads[mode] = {n: p.grad.float().clone() for n, p in aset.named_trainable_parameters()}
    for name, g in grads["fast"].items():
        assert g.abs().sum() > 0, name
        assert rel(grads["exact"][name], g) < 2e-2, name
