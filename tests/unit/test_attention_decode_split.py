"""Split-KV decode attention (orbit.kernels.attention_decode) under Triton's interpreter,
against the float64 reference of attention_exact on fresh random caches: GQA groups that
pad the tile (1, 2, 4 query heads per KV head), positions that leave chunks empty, a split
larger than the live context, scattered slots, poisoned outputs, and the arrival counters
re-armed (a second call gives the same bits). GPU: tests/gpu/test_attention_decode_gpu.py."""

from __future__ import annotations

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")
# (B, H, Hkv, D, max_context, split, positions, DecodeConfig fields or None)
# split 1 is the direct path (no workspace) fast mode runs when the batch fills the GPU.
CASES = [(1, 4, 4, 16, 256, 4, [200], None), (3, 8, 4, 32, 128, 2, [0, 63, 127], None),
         (2, 8, 2, 16, 320, 5, [5, 300], None), (4, 4, 1, 16, 192, 3, [64, 65, 130, 191], None),
         (3, 8, 4, 32, 256, 1, [0, 64, 255], None), (2, 4, 2, 16, 200, 1, [17, 199], (32, 2, 3)),
         (2, 8, 2, 16, 320, 3, [40, 319], (128, 8, 1)),
         # prefetching the next block: chunks of 1, 2 and many blocks, an empty chunk
         (3, 8, 4, 32, 256, 1, [0, 64, 255], (32, 2, 2, True)),
         (2, 8, 2, 16, 320, 4, [5, 319], (32, 1, 2, True)), (1, 4, 4, 16, 256, 2, [200], (64, 4, 2, True))]


def _interpreter_main() -> None:
    import json

    patch_interpreter(bf16_dot=True, bf16_round=True)
    from orbit.kernels.attention_decode import DecodeConfig, attention_decode_split
    from orbit.kernels.attention_exact import attention_exact_reference

    out = {}
    for i, (b, h, hkv, d, ctx, split, pos, cfg) in enumerate(CASES):
        config = DecodeConfig(*cfg) if cfg else None
        g = torch.Generator().manual_seed(100 + i)
        kc = torch.randn(b + 2, ctx + 8, hkv, d, generator=g)
        vc = torch.randn(b + 2, ctx + 8, hkv, d, generator=g)
        q = torch.randn(b, h, d, generator=g)
        slots = torch.randperm(b + 2, generator=g)[:b]
        start = torch.tensor(pos)
        scale = d ** -0.5
        y = attention_decode_split(q, kc, vc, slots, start, ctx, split, scale, config)
        y2 = attention_decode_split(q, kc, vc, slots, start, ctx, split, scale, config)
        err = 0.0
        for r in range(b):
            p = pos[r]
            ref = attention_exact_reference(q[r:r + 1], kc[slots[r], :p + 1], vc[slots[r], :p + 1],
                                            torch.tensor([p]), scale)
            err = max(err, float((y[r:r + 1] - ref).abs().max()))
        out[str(i)] = {"err": err, "finite": bool(y.isfinite().all()), "same": bool(torch.equal(y, y2))}
    out["rope"] = _rope_fold_cases()
    print(json.dumps(out))


# (B, H, Hkv, D, max_context, split, positions, q/k norm, dtype, DecodeConfig fields or None)
ROPE_CASES = [(2, 8, 4, 32, 256, 4, [0, 200], True, "float32", None),  # new token: chunk 0 / 3
              (3, 4, 1, 16, 192, 3, [63, 64, 191], False, "float32", None),  # chunk borders
              (2, 8, 2, 16, 320, 1, [5, 319], True, "bfloat16", None),  # direct path
              (1, 8, 4, 32, 256, 2, [130], True, "bfloat16", (32, 4, 2, True))]  # prefetch


def _rope_fold_cases() -> dict:
    """The attention launch doing q/k norm + RoPE and the cache write itself (DecodeRope)
    against qk_norm_rope_kv followed by the plain launch: the same cache bytes, the same
    outputs."""
    from orbit.kernels.attention_decode import DecodeConfig, DecodeRope, attention_decode_split
    from orbit.kernels.rope import qk_norm_rope_kv

    out = {}
    for i, (b, h, hkv, d, ctx, split, pos, norm, dt, cfg) in enumerate(ROPE_CASES):
        dtype = getattr(torch, dt)
        config = DecodeConfig(*cfg) if cfg else None
        g = torch.Generator().manual_seed(300 + i)
        kc = torch.randn(b + 2, ctx + 8, hkv, d, generator=g).to(dtype)
        vc = torch.randn(b + 2, ctx + 8, hkv, d, generator=g).to(dtype)
        q = torch.randn(b, h, d, generator=g).to(dtype) * 3
        k = torch.randn(b, hkv, d, generator=g).to(dtype) * 3
        v = torch.randn(b, hkv, d, generator=g).to(dtype)
        qw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norm else None
        kw = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype) if norm else None
        ang = torch.rand(b, d // 2, generator=g) * 6
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
        slots = torch.randperm(b + 2, generator=g)[:b]
        start = torch.tensor(pos)
        kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        qo = qk_norm_rope_kv(q, k, v, qw, kw, 1e-6, cos, sin, kc2, vc2, slots, start)
        want = attention_decode_split(qo, kc2, vc2, slots, start, ctx, split, config=config)
        got = attention_decode_split(q, kc1, vc1, slots, start, ctx, split, config=config,
                                     rope=DecodeRope(k, v, qw, kw, 1e-6, cos, sin))
        again = attention_decode_split(q, kc1, vc1, slots, start, ctx, split, config=config,
                                       rope=DecodeRope(k, v, qw, kw, 1e-6, cos, sin))
        out[str(i)] = {"cache_equal": bool(torch.equal(kc1, kc2) and torch.equal(vc1, vc2)),
                       "err": float((got.float() - want.float()).abs().max()),
                       "scale": float(want.float().abs().max()),
                       "same": bool(torch.equal(got, again))}
    return out


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_split_decode_matches_reference(interp_results: dict, case: int) -> None:
    r = interp_results[str(case)]
    assert r["finite"], r
    assert r["err"] < 1e-4, r  # fp32 (ieee dots): reduction order only
    assert r["same"], r  # deterministic, counters re-armed


@pytest.mark.parametrize("case", range(len(ROPE_CASES)))
def test_decode_launch_does_the_norm_rope_and_cache_write(interp_results: dict, case: int) -> None:
    r = interp_results["rope"][str(case)]
    assert r["cache_equal"], r  # k (normed, rotated) and v at the new position, nothing else
    # the interpreter sums in one order for both layouts: the same values (on the GPU the
    # query norm's sum may differ in its last bit, tests/gpu)
    assert r["err"] <= 1e-6 * max(1.0, r["scale"]), r
    assert r["same"], r


def test_pick_splits() -> None:
    from orbit.kernels.attention_decode import SPLIT_MAX, pick_splits

    assert pick_splits(1, 8, 256, 132) == 4  # 4 blocks of 64: one chunk each
    assert pick_splits(1, 8, 4096, 132) == SPLIT_MAX
    assert pick_splits(64, 8, 4096, 132) == 1  # 512 programs already fill 132 SMs
    assert pick_splits(1, 8, 1, 132) == 1
    for n, hkv, ctx in [(1, 8, 2048), (2, 4, 320), (8, 8, 1000), (3, 2, 65)]:
        s = pick_splits(n, hkv, ctx, 132)
        blocks = -(-ctx // 64)
        chunk = -(-blocks // s)
        assert 1 <= s <= SPLIT_MAX and (s - 1) * chunk < blocks, (n, hkv, ctx, s)  # none empty


def test_pick_decode() -> None:
    """The measured launch table (docs/benchmarks.md): block-per-chunk 64-position splits at
    batch 1 and short contexts, prefetching 32-position chunks for long ones, 2 warps and no
    split once the batch fills the GPU, 1 warp for 1024+ (sequence, KV head) pairs."""
    from orbit.kernels.attention_decode import DecodeConfig, pick_decode

    assert pick_decode(1, 8, 320, 132) == (5, DecodeConfig(64, 4, 2))  # 5 blocks, 5 chunks
    split, cfg = pick_decode(1, 8, 4096, 132)
    assert cfg == DecodeConfig(32, 4, 2, prefetch=True) and split == 16
    assert pick_decode(4, 8, 2048, 132)[1].prefetch  # 9 chunks of 64 would be 2 blocks each
    assert pick_decode(16, 8, 320, 132) == (3, DecodeConfig(32, 2, 2))
    assert pick_decode(64, 8, 320, 132) == (1, DecodeConfig(32, 2, 2))
    assert pick_decode(256, 8, 2048, 132) == (1, DecodeConfig(32, 1, 2))


def test_split_refuses_bad_input() -> None:
    from orbit.kernels.attention_decode import attention_decode_split

    kc = torch.zeros(2, 64, 2, 16)
    q = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="split >= 1"):
        attention_decode_split(q, kc, kc, torch.tensor([0]), torch.tensor([3]), 64, 0, 0.25)
    with pytest.raises(ValueError, match="max_context"):
        attention_decode_split(q, kc, kc, torch.tensor([0]), torch.tensor([3]), 65, 2, 0.25)
    with pytest.raises(ValueError, match="one new token per sequence"):
        attention_decode_split(torch.zeros(2, 4, 16), kc, kc, torch.tensor([0]), torch.tensor([3]),
                               64, 2, 0.25)


if __name__ == "__main__":
    _interpreter_main()
