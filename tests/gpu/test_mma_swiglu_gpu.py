"""int4_mma's SwiGLU store (`swiglu=True`, `_qgemm.MMA_SWIGLU`): the stacked gate/up forward
stores silu(gate) * up itself, bit for bit the plain store followed by the silu_mul launch,
for every format the kernel runs, every row count it takes and the forms the pick uses (one
program per tile, warps along K, two row tiles), tail tiles included; and an engine with the
fold on samples the tokens and log-probs of one without it."""

from __future__ import annotations

import pytest
import torch
from gpu_models import bits, mixed_prompts, run_engine, small_qwen3

from orbit.kernels.random_weights import random_qweight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _pair(fmt: str, m: int, k: int, n: int, cfg, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fold's output, the plain store's output through silu_mul)."""
    from orbit.kernels.int4_mma import int4_mma_weight
    from orbit.kernels.swiglu import silu_mul

    kw = {"group_size": 128} if fmt == "int4" else {}
    qw = random_qweight(fmt, n, k, seed=seed, device="cuda", **kw)
    x = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1)
                    ).bfloat16()
    h = int4_mma_weight(x, qw, cfg)
    want = silu_mul(h[:, : n // 2].contiguous(), h[:, n // 2:].contiguous())
    out = torch.full((m, n // 2), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = int4_mma_weight(x, qw, cfg, out=out, swiglu=True)
    assert got.data_ptr() == out.data_ptr()
    return got, want


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "fp8"])
@pytest.mark.parametrize("m", [1, 4, 9, 16, 24, 32])
@pytest.mark.parametrize("k,n", [(2048, 12288), (512, 400)])
def test_swiglu_store_gives_the_separate_launches_bits(fmt: str, m: int, k: int, n: int) -> None:
    """The shipped pick (warps along K where it fits); 400 rows: 200 gate rows, a tail tile."""
    got, want = _pair(fmt, m, k, n, None, seed=m + n)
    assert torch.isfinite(got).all(), "an output element was not written"
    assert torch.equal(got, want), (fmt, m, k, n)


@pytest.mark.parametrize("cfg", [dict(warps=4, row_tiles=1), dict(warps=2, row_tiles=2),
                                 dict(warps=1, kw=4), dict(warps=2, kw=2, row_tiles=2,
                                                           prefetch=2)])
@pytest.mark.parametrize("m", [1, 16])
def test_swiglu_store_in_every_program_shape(cfg: dict, m: int) -> None:
    from orbit.kernels.int4_mma import MmaConfig

    got, want = _pair("int4", m, 2048, 6144, MmaConfig(**cfg), seed=7)
    assert torch.equal(got, want), cfg


def test_swiglu_store_refuses_a_split_and_an_odd_weight() -> None:
    from orbit.kernels.int4_mma import MmaConfig, int4_mma_weight

    qw = random_qweight("int4", 1024, 2048, seed=1, device="cuda", group_size=128)
    x = torch.randn(4, 2048, device="cuda").bfloat16()
    with pytest.raises(ValueError, match="swiglu"):
        int4_mma_weight(x, qw, MmaConfig(split=2), swiglu=True)
    odd = random_qweight("int4", 1023, 2048, seed=1, device="cuda", group_size=128)
    with pytest.raises(ValueError, match="swiglu"):
        int4_mma_weight(x, odd, MmaConfig(), swiglu=True)


@pytest.mark.parametrize("batch", [1, 4])
def test_engine_with_the_fold_samples_the_same_bits(batch: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen3 INT4 (small), sampling on, graphs on: MMA_SWIGLU on gives the completions of it
    off, and the gate/up launches then take the fold."""
    from orbit.kernels import _qgemm, dispatch
    from orbit.rollout.types import SamplingParams

    model = small_qwen3("int4")
    ps = mixed_prompts(5)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=11, ignore_eos=True)
    monkeypatch.setattr(_qgemm, "MMA_SWIGLU", False)
    _, off = run_engine(model, ps, sp, batch)
    taken: list[bool] = []
    orig = dispatch._mma_swiglu

    def spy(x, qw):
        taken.append(orig(x, qw))
        return taken[-1]

    monkeypatch.setattr(dispatch, "_mma_swiglu", spy)
    monkeypatch.setattr(_qgemm, "MMA_SWIGLU", True)
    _, on = run_engine(model, ps, sp, batch)
    assert bits(on) == bits(off)
    assert any(taken), "no stacked gate/up forward took the fold"
