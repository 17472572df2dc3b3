"""Split-KV decode attention on the GPU: bf16 caches at the Qwen3 head shapes against the
float64 reference, eagerly and in replays of one captured CUDA graph whose positions change
between replays (chunks empty or full; the arrival counters re-arm themselves)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)


def _ref(q, kc, vc, slots, pos, scale):
    from orbit.kernels.attention_exact import attention_exact_reference

    rows = [attention_exact_reference(q[r:r + 1], kc[slots[r], :p + 1], vc[slots[r], :p + 1],
                                      torch.tensor([p], device=q.device), scale)
            for r, p in enumerate(pos)]
    return torch.cat(rows)


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("b,h,hkv,d,ctx", [(1, 16, 8, 128, 256), (2, 32, 8, 128, 2048),
                                           (4, 14, 2, 64, 512)])
def test_split_decode_bf16(b: int, h: int, hkv: int, d: int, ctx: int) -> None:
    from orbit.kernels.attention_decode import attention_decode_split, pick_splits

    g = torch.Generator(device="cuda").manual_seed(b * 100 + ctx)
    kc = torch.randn(b + 1, ctx, hkv, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn(b + 1, ctx, hkv, d, device="cuda", generator=g).bfloat16()
    q = torch.randn(b, h, d, device="cuda", generator=g).bfloat16()
    slots = torch.arange(1, b + 1, device="cuda")
    split = pick_splits(b, hkv, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    assert split >= 2
    for pos in ([ctx - 1] * b, [0] * b, [min(ctx - 1, 64 * i + 3) for i in range(b)]):
        start = torch.tensor(pos, device="cuda")
        y = attention_decode_split(q, kc, vc, slots, start, ctx, split, d ** -0.5)
        assert y.isfinite().all()
        assert _rel(y, _ref(q, kc, vc, slots.tolist(), pos, d ** -0.5)) < 1e-2, (pos, split)


def test_split_decode_in_a_cuda_graph() -> None:
    from orbit.kernels.attention_decode import attention_decode_split

    b, h, hkv, d, ctx, split = 1, 16, 8, 128, 512, 8
    kc = torch.randn(2, ctx, hkv, d, device="cuda").bfloat16()
    vc = torch.randn(2, ctx, hkv, d, device="cuda").bfloat16()
    q = torch.randn(b, h, d, device="cuda").bfloat16()
    slots = torch.tensor([1], device="cuda")
    start = torch.tensor([0], device="cuda")
    attention_decode_split(q, kc, vc, slots, start, ctx, split, d ** -0.5)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = attention_decode_split(q, kc, vc, slots, start, ctx, split, d ** -0.5)
    for p in (0, 63, 64, 300, 511, 7):
        start.fill_(p)
        q.copy_(torch.randn(b, h, d, device="cuda").bfloat16())
        y.fill_(float("nan"))
        graph.replay()
        eager = attention_decode_split(q, kc, vc, slots, start, ctx, split, d ** -0.5)
        assert torch.equal(y, eager), p
        assert _rel(y, _ref(q, kc, vc, [1], [p], d ** -0.5)) < 1e-2, p


@pytest.mark.parametrize("b,ctx,cfg", [(64, 320, None), (16, 1024, (32, 2, 3)), (256, 256, (128, 4, 2))])
def test_direct_decode_bf16(b: int, ctx: int, cfg: tuple | None) -> None:
    """split = 1 (a batch that fills the GPU): one program per (sequence, KV head), no
    workspace; random live positions per sequence, poisoned output, other launch configs."""
    from orbit.kernels.attention_decode import DecodeConfig, attention_decode_split

    h, hkv, d = 16, 8, 128
    g = torch.Generator(device="cuda").manual_seed(b + ctx)
    kc = torch.randn(b + 1, ctx, hkv, d, device="cuda", generator=g).bfloat16()
    vc = torch.randn(b + 1, ctx, hkv, d, device="cuda", generator=g).bfloat16()
    q = torch.randn(b, h, d, device="cuda", generator=g).bfloat16()
    slots = torch.randperm(b + 1, device="cuda", generator=g)[:b]
    pos = torch.randint(0, ctx, (b,), device="cuda", generator=g)
    config = DecodeConfig(*cfg) if cfg else None
    y = attention_decode_split(q, kc, vc, slots, pos, ctx, 1, config=config)
    assert y.isfinite().all()
    assert _rel(y, _ref(q, kc, vc, slots.tolist(), pos.tolist(), d ** -0.5)) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = attention_decode_split(q, kc, vc, slots, pos, ctx, 1, config=config)
    yg.fill_(float("nan"))
    graph.replay()
    assert torch.equal(yg, y)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_engine_fold_rope_matches_the_separate_launch(fmt: str) -> None:
    """Engine(fold_rope=True): each decode step's attention launch does q/k norm + RoPE and
    the cache write itself. Against fold_rope=False (qk_norm_rope_kv then the attention), same
    run, graphs on: the same tokens on the small Qwen3's peaked distributions, log-probs within
    the last-bit differences of the query norm's sum (its layout differs)."""
    from gpu_models import mixed_prompts, run_engine, small_qwen3

    from orbit.rollout.types import SamplingParams

    model = small_qwen3(fmt)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5, ignore_eos=True)
    prompts = mixed_prompts(9)
    _, off = run_engine(model, prompts, sp, 4, fold_rope=False)
    _, on = run_engine(model, prompts, sp, 4, fold_rope=True)
    same = sum(a.tokens == b.tokens for a, b in zip(off, on))
    assert same >= 3, (same, [a.tokens for a in off], [b.tokens for b in on])
    for a, b in zip(off, on):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        if n:
            d = max(abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n]))
            assert d < 2e-2, d
