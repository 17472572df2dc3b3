"""Exact mode on a GPU: each batch-invariant kernel keeps a row's bits whatever rides along
with it, and the engine's sampled log-probs equal the trainer's packed re-score bit for bit
for every precision and adapter. Run on the lent machine: bash scripts/gpu_run.sh tests."""

from __future__ import annotations

import itertools

import pytest
import torch

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(2048, 2048), (1000, 777), (64, 6144)])
def test_matmul_exact_row_invariant(dtype: torch.dtype, n: int, k: int) -> None:
    from orbit.kernels.matmul_exact import matmul_exact_reference, matmul_exact_triton

    g = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    x = torch.randn(4096, k, device="cuda", generator=g).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    full = matmul_exact_triton(x, w, bias)
    assert torch.isfinite(full).all()
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert rel(full, matmul_exact_reference(x, w, bias)) < tol
    seven = matmul_exact_triton(x[:7], w, bias)
    assert torch.equal(seven, full[:7])
    for i in (0, 3, 4095, 1234):
        assert torch.equal(matmul_exact_triton(x[i : i + 1], w, bias)[0], full[i]), i
    # a row moved to another position of another batch keeps its bits
    perm = torch.randperm(300, device="cuda")
    assert torch.equal(matmul_exact_triton(x[:300][perm], w, bias), full[:300][perm])


def test_rmsnorm_exact_row_invariant() -> None:
    from orbit.kernels.rmsnorm_exact import rmsnorm_exact_reference, rmsnorm_exact_triton

    x = torch.randn(4096, 2048, device="cuda").bfloat16()
    w = (torch.rand(2048, device="cuda") + 0.5).bfloat16()
    full = rmsnorm_exact_triton(x, w, 1e-6)
    assert rel(full, rmsnorm_exact_reference(x, w, 1e-6)) < 1e-2
    assert torch.equal(rmsnorm_exact_triton(x[5:6], w, 1e-6)[0], full[5])
    assert torch.equal(rmsnorm_exact_triton(x[:7], w, 1e-6), full[:7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv,D", [(16, 8, 128), (9, 3, 64)])
def test_attention_packed_equals_decode(dtype: torch.dtype, H: int, Hkv: int, D: int) -> None:
    from orbit.kernels.attention_exact import (
        attention_cached_exact,
        attention_exact_reference,
        attention_packed_exact,
    )

    g = torch.Generator(device="cuda").manual_seed(H * D)
    lens = [300, 1, 64, 65, 129]
    T = sum(lens)
    q = torch.randn(T, H, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(T, Hkv, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(T, Hkv, D, device="cuda", generator=g).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    packed = attention_packed_exact(q, k, v, cu, max(lens))
    bounds = cu.tolist()
    for a, e in itertools.pairwise(bounds):
        ref = attention_exact_reference(q[a:e], k[a:e], v[a:e], torch.arange(e - a, device="cuda"))
        assert rel(packed[a:e], ref) < 1e-2
    # KV cache with garbage everywhere, then each sequence written into a shuffled slot
    S, L = 7, 320
    kc = torch.randn(S, L, Hkv, D, device="cuda", generator=g).to(dtype)
    vc = torch.randn(S, L, Hkv, D, device="cuda", generator=g).to(dtype)
    slots = [5, 0, 3, 6, 2]
    for b, (a, e) in enumerate(itertools.pairwise(bounds)):
        kc[slots[b], : e - a], vc[slots[b], : e - a] = k[a:e], v[a:e]
    # decode: every position of every still-running sequence, all sequences in one batch
    for t in range(max(lens)):
        live = [b for b in range(len(lens)) if t < lens[b]]
        rows = torch.tensor([bounds[b] + t for b in live], device="cuda")
        out = attention_cached_exact(
            q[rows], kc, vc, torch.arange(len(live) + 1, dtype=torch.int32, device="cuda"),
            torch.tensor([slots[b] for b in live], device="cuda"), torch.full((len(live),), t, device="cuda"), 1)
        assert torch.equal(out, packed[rows]), t
    # chunked prefill of the last sequence from position 70 on
    a, e = bounds[-2], bounds[-1]
    out = attention_cached_exact(q[a + 70 : e], kc, vc, torch.tensor([0, e - a - 70], dtype=torch.int32, device="cuda"),
                                 torch.tensor([slots[-1]], device="cuda"), torch.tensor([70], device="cuda"), e - a - 70)
    assert torch.equal(out, packed[a + 70 : e])


def test_log_softmax_row_invariant() -> None:
    """The shared log-prob function is plain torch: check it keeps a row's bits too."""
    from orbit.models.logprobs import logprobs_from_logits

    z = (torch.randn(2048, 151936, device="cuda") * 4).bfloat16()
    t = torch.randint(0, 151936, (2048,), device="cuda")
    full, _ = logprobs_from_logits(z, t)
    assert torch.equal(logprobs_from_logits(z[9:10], t[9:10])[0], full[9:10])
    assert torch.equal(logprobs_from_logits(z[:7], t[:7])[0], full[:7])


CASES = [("bf16", "none"), ("bf16", "lora"), ("bf16", "oft"), ("int4", "lora"), ("fp8", "lora"),
         ("fp8-w8a8", "lora"), ("nvfp4", "lora"), ("mxfp4", "oft")]


@pytest.fixture(scope="module")
def base_model():
    from orbit.alignment.variants import random_model
    from orbit.models.config import ModelConfig

    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=32000, hidden_size=1024, intermediate_size=3072,
                      num_layers=4, num_heads=16, num_kv_heads=8, head_dim=128, qk_norm=True,
                      rope_theta=1e6, max_position_embeddings=1024)
    return random_model(cfg, "cuda", torch.bfloat16, seed=0)


@pytest.mark.parametrize("precision,adapter", CASES)
def test_exact_mode_engine_equals_trainer(base_model, precision: str, adapter: str) -> None:
    from orbit.alignment.measure import measure_mismatch, random_prompts
    from orbit.alignment.variants import build_variant
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    model, _ = build_variant(base_model, precision, adapter, "exact")
    engine = Engine(model, max_num_seqs=24, max_model_len=256, exact=True)  # CUDA graphs on
    prompts = random_prompts(6, model.config.vocab_size, min_len=5, max_len=90, seed=1)
    sp = SamplingParams(temperature=1.0, max_new_tokens=40, seed=2)
    m = measure_mismatch(model, engine, prompts, sp, n=4).metrics
    assert m.n_tokens > 100
    assert m.frac_diff == 0.0 and m.max_abs == 0.0, m



def test_exact_mode_gradients_match_fast(base_model) -> None:
    from orbit.alignment.variants import build_variant
    from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
    from orbit.models.logprobs import token_logprobs

    lens = [300, 77, 5]
    ids = torch.randint(0, base_model.config.vocab_size, (sum(lens),), device="cuda")
    grads = {}
    for mode in ("fast", "exact"):
        model, aset = build_variant(base_model, "bf16", "lora", mode)
        h = model(ids, positions_from_lengths(lens, "cuda"), AttnBatch.packed(cu_seqlens_from_lengths(lens, "cuda")))
        (-token_logprobs(model, h, torch.roll(ids, -1)).sum()).backward()
        grads[mode] = {n: p.grad.float().clone() for n, p in aset.named_trainable_parameters()}
    for name, g in grads["fast"].items():
        assert g.abs().sum() > 0 and torch.isfinite(grads["exact"][name]).all(), name
        assert rel(grads["exact"][name], g) < 5e-2, name
