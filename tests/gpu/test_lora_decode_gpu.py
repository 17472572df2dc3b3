"""Fused LoRA decode on CUDA (orbit/kernels/lora_decode.py, orbit/adapters/lora_decode.py,
orbit/kernels/lora_epilogue.py): the two kernels at the Qwen3-1.7B shapes against the unfused
forward on fresh random inputs, the expand-add folded into each quantized decode GEMV against
that GEMV followed by the expand-add kernel, and the engine with a LoRA slot active,
graph-replayed and PDL-launched: plain vs decode groups vs groups folded into the GEMV."""

from __future__ import annotations

import pytest
import torch
from gpu_models import V, mixed_prompts, run_engine, small_qwen3

from orbit.adapters.inject import AdapterConfig, inject_adapters
from orbit.adapters.lora_decode import link_lora_decode, unlink_lora_decode
from orbit.kernels import dispatch
from orbit.kernels.lora_decode import (
    lora_decode_triton,
    lora_expand_add,
    lora_shrink,
)
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.random_weights import random_qweight
from orbit.rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("m", [1, 7, 16, 64, 100, 256])
@pytest.mark.parametrize("k,ns", [(2048, [2048, 1024, 1024]), (2048, [6144, 6144]),
                                  (2048, [2048]), (6144, [2048])])
def test_kernels_at_qwen3_shapes(m: int, k: int, ns: list[int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(m + k + len(ns))
    r = 16

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * s).bfloat16()

    x = rnd(m, k)
    a = [rnd(r, k, s=0.02) for _ in ns]
    b = [rnd(n, r, s=0.05) for n in ns]
    big = rnd(m, sum(ns))
    y = list(torch.split(big, ns, dim=1))
    # the unfused forward's rounding points with exact (float64) sums, so the reference does
    # not depend on which algorithm cuBLAS picks for the shape (a 100-row case failed against
    # cuBLAS's bf16 products by 6e-4 where the kernel matches the exact sums to an ulp)
    ref = [(yi.double() + (2.0 * ((x.double() @ ai.double().T).bfloat16().double()
                                  @ bi.double().T).bfloat16().float()).bfloat16().double()
            ).bfloat16() for ai, bi, yi in zip(a, b, y)]
    before = big.clone()
    lora_decode_triton(x, a, b, y, 2.0)
    for yi, ri, bi, ai, bbi in zip(y, ref, torch.split(before, ns, dim=1), a, b):
        assert not torch.equal(yi, bi)  # written
        diff = (yi.float() - ri.float()).abs()
        # Only the summation order differs: a rounding step of h, of the delta or of y may land
        # one bf16 ulp away, so the bound is an ulp of y plus two of the delta, plus what one
        # ulp of each h element moves the delta by (scale * |h| |B|^T * 2^-7, which exceeds an
        # ulp of the delta where the delta's sum cancels)
        delta = (ri.float() - bi.float()).abs()
        h_prop = 2.0 * ((x.float() @ ai.float().T).abs() @ bbi.float().abs().T) * 2.0 ** -7
        tol = ((ri.float().abs() + 2 * delta) * 2.0 ** -7 + h_prop) * 1.01
        assert (diff <= tol).all(), (diff - tol).max()
        assert (diff > 0).float().mean() < 0.1


def _ulp_bound(ref: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp of y plus two of the delta (a rounding step of the delta or of y may land
    one ulp away when only the summation order differs)."""
    delta = (ref.float() - base.float()).abs()
    return (ref.float().abs() + 2 * delta) * 2.0 ** -7 * 1.01


@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4", "mxfp4", "int8"])
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("k,ns", [(2048, [2048, 1024, 1024]), (2048, [6144, 6144]),
                                  (2048, [2048]), (6144, [2048])])
def test_gemv_epilogue_at_qwen3_shapes(fmt: str, m: int, k: int, ns: list[int],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """qmm_lora (shrink, then the base launch with the expand-add in its store: the decode
    GEMV, or the tl.dot loop for one member) vs the same base launch and the separate
    expand-add kernel, wherever the shape takes the epilogue. With the mma route off: it
    takes INT4's 2-8 and NVFP4's 1-16 rows first, and has no epilogue (the engine then runs
    the LoRA separately), while the fused epilogues still serve wherever its operands do
    not fit. The dequantize + cuBLAS thresholds are pinned at 1024 rows for every format
    (DEQUANT_MIN_M_BY_FMT emptied) so that 64 and 256 rows test the loop's epilogue, which
    formats without a measured threshold still run there."""
    from orbit.kernels import _qgemm

    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})
    monkeypatch.setattr(_qgemm, "DEQUANT_MIN_M_BY_FMT", {})
    kw = {"group_size": 128} if fmt == "int4" else {"group_size": 32} if fmt == "int8" else {}
    qw = random_qweight(fmt, sum(ns), k, seed=m + k, device="cuda", **kw)
    g = torch.Generator(device="cuda").manual_seed(m * k + len(ns))
    x = (torch.randn(m, k, generator=g, device="cuda")).bfloat16()
    if not dispatch.lora_foldable(x, qw, len(ns)):
        pytest.skip(f"{fmt} M={m} {k}x{sum(ns)}: {len(ns)} members need the decode GEMV")
    r = 16
    a = [(torch.randn(r, k, generator=g, device="cuda") * 0.02).bfloat16() for _ in ns]
    b = [(torch.randn(n, r, generator=g, device="cuda") * 0.05).bfloat16() for n in ns]
    h = lora_shrink(x, a)
    y = dispatch.qmm_lora(x, qw, LoRAEpilogue(h, tuple(b), 2.0))
    base = dispatch.qmm(x, qw)
    ref = base.clone()
    lora_expand_add(h, b, list(torch.split(ref, ns, dim=1)), 2.0)
    assert not torch.equal(y, base)  # the delta landed
    diff = (y.float() - ref.float()).abs()
    assert (diff <= _ulp_bound(ref, base)).all(), (diff - _ulp_bound(ref, base)).max()
    assert (diff > 0).float().mean() < 0.05
    # With A: the launch computes h itself (shrink programs in the plane / FP8 GEMV's grid, a
    # shrink launch first elsewhere), twice in a row (its counters re-armed between)
    for _ in range(2):
        hk = torch.full_like(h, float("nan"))
        yk = dispatch.qmm_lora(x, qw, LoRAEpilogue(hk, tuple(b), 2.0, tuple(a)))
        dh = (hk.float() - h.float()).abs()
        # an ulp of h at most (another summation order), plus where h is a cancellation the
        # fp32 sums' own order error, which scales with sum |x||a| over K (6144 here)
        habs = x.float().abs() @ torch.cat(a).float().abs().T
        bound = torch.maximum(h.float().abs(), hk.float().abs()) * 2.0 ** -7 * 1.01 + habs * 2e-6
        assert (dh <= bound).all(), (dh - bound).max()
        if torch.equal(hk, h):
            assert torch.equal(yk, y)


@pytest.mark.timeout(120)  # a lost signal would spin the launch forever: fail, do not hang
@pytest.mark.parametrize("m,ns", [(1, [2048, 1024, 1024]), (16, [2048]), (200, [6144])])
def test_in_kernel_shrink_replays_in_a_graph(m: int, ns: list[int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A base launch with h computed in its own grid (the q/k/v decode GEMV at one row; the
    tl.dot loop at 16 and 200 rows: INT4's dequantize + cuBLAS threshold pinned at 1024, as
    for the formats that still run the loop there), captured once and replayed 20 times with
    PDL: every replay gives the eager result (the h counters are re-armed each time). The
    rules' routes: a shipped route table may send these rows elsewhere (the H100's sends 200
    rows to dequantize + cuBLAS, which computes h in a launch of its own), and no mma route
    (INT4 takes it at 16 rows with a LoRA delta since session 30, the delta then in launches
    of its own: MMA_WITH_LORA_MIN_M)."""
    from orbit.kernels import _qgemm
    from orbit.kernels.qmm_routes import ROUTES

    monkeypatch.setattr(_qgemm, "DEQUANT_MIN_M_BY_FMT", {})
    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})
    with ROUTES.scoped(None):
        _check_shrink_replays(m, ns)


def _check_shrink_replays(m: int, ns: list[int]) -> None:
    from orbit.kernels.gemv import lora_counters
    from orbit.kernels.pdl import pdl_scope

    k, r = 2048, 16
    qw = random_qweight("int4", sum(ns), k, seed=5, device="cuda", group_size=128)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    a = tuple((torch.randn(r, k, generator=g, device="cuda") * 0.02).bfloat16() for _ in ns)
    b = tuple((torch.randn(n, r, generator=g, device="cuda") * 0.05).bfloat16() for n in ns)
    assert dispatch.lora_shrink_in_kernel(x, qw)
    h = torch.empty(m, len(ns) * r, device="cuda", dtype=torch.bfloat16)
    want = dispatch.qmm_lora(x, qw, LoRAEpilogue(h, b, 2.0, a)).clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pdl_scope(True):
        dispatch.qmm_lora(x, qw, LoRAEpilogue(h, b, 2.0, a))  # warm-up on the capture stream
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = dispatch.qmm_lora(x, qw, LoRAEpilogue(h, b, 2.0, a))
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)
    with torch.cuda.stream(stream):
        assert lora_counters(x.device).tolist() == [0, 0]


def _model_with_active_lora(fmt: str):
    """small_qwen3(fmt) with LoRA r16 on every linear, a nonzero adapter staged into slot 1 and
    active: (model, adapter set)."""
    model = small_qwen3(fmt)
    aset = inject_adapters(model, AdapterConfig(r=16, alpha=32.0))
    with torch.no_grad():
        for mod in aset.modules.values():
            mod.lora_B.normal_(0.0, 0.05)
    aset.stage(0, 1)
    aset.set_active(1)
    return model, aset


def test_engine_fused_lora_matches_plain() -> None:
    """Slot 1 holds a nonzero adapter; greedy completions and their log-probs with the decode
    groups equal the plain LoRA forward's up to summation order, at batch 1 and 4, graphs and
    PDL on; an engine with fuse_lora=False runs the plain path."""
    model, aset = _model_with_active_lora("int4")
    ps = mixed_prompts(3)
    sp = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    folds = []
    real = dispatch.qmm_lora
    dispatch.qmm_lora = lambda *a, **kw: folds.append(a[0].shape[0]) or real(*a, **kw)
    try:
        for batch in (1, 4):
            outs = []
            for variant in ("plain", "groups", "fold"):
                unlink_lora_decode(model)
                if variant == "groups":  # linked here, left alone by a fuse_lora=False engine
                    link_lora_decode(model, fold=False)
                n_folds = len(folds)
                eng, out = run_engine(model, ps, sp, batch, fuse_lora=variant == "fold")
                assert (eng.lora_groups > 0) is (variant == "fold")
                # the engine folds at both batches (a decode GEMV or the tl.dot loop at every
                # quantized linear); the other variants never fold
                assert (len(folds) > n_folds) is (variant == "fold")
                outs.append(out)
            for plain, other in [*zip(outs[0], outs[1]), *zip(outs[0], outs[2])]:
                n = next((i for i, (a, b) in enumerate(zip(plain.tokens, other.tokens))
                          if a != b), len(plain.tokens))
                assert n >= 8, (plain.tokens, other.tokens)  # a sharp head: no early tie
                lp = torch.tensor(plain.logprobs[:n])
                lf = torch.tensor(other.logprobs[:n])
                assert (lp - lf).abs().max() < 0.05, (lp, lf)
    finally:
        dispatch.qmm_lora = real
    # the adapter matters here (else the comparison above proves nothing)
    unlink_lora_decode(model)
    aset.set_active(None)
    base = run_engine(model, ps, sp, 4)[1]
    assert any(b.tokens != f.tokens for b, f in zip(base, outs[2]))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_engine_rollout_batch_lora_matches_plain(fmt: str) -> None:
    """A rollout-sized batch (80 sequences: past INT4's and NVFP4's dequantize + cuBLAS
    thresholds) with a LoRA slot active: graph-replayed decode steps run the grouped shrink and
    expand-add over dequantize + cuBLAS bases (quantized sibling groups serving those rows
    too), and the greedy tokens and log-probs match the plain LoRA forward's up to summation
    order; the adapter changes the output."""
    from orbit.kernels import lora_decode as kmod

    model, aset = _model_with_active_lora(fmt)
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(2, V, (int(n),), generator=g).tolist()
          for n in torch.randint(3, 40, (80,), generator=g)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    rows: list[int] = []
    real = kmod.lora_expand_add
    kmod.lora_expand_add = lambda h, *a, **kw: rows.append(h.shape[0]) or real(h, *a, **kw)
    try:
        plain = run_engine(model, ps, sp, 80, fuse_lora=False)[1]
        assert not rows  # the plain LoRA forward: no group launch
        fused = run_engine(model, ps, sp, 80, fuse_lora=True)[1]
    finally:
        kmod.lora_expand_add = real
    assert max(rows) >= 80  # the groups served the 80-row steps (graph capture or prefill)
    agree = total = 0
    for a, b in zip(plain, fused):
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        agree, total = agree + n, total + len(a.tokens)
        if n:
            d = (torch.tensor(a.logprobs[:n]) - torch.tensor(b.logprobs[:n])).abs().max()
            assert d < 0.05, (fmt, float(d))
    assert agree >= 0.75 * total, (fmt, agree, total)  # greedy paths split only at near-ties
    unlink_lora_decode(model)
    aset.set_active(None)
    base = run_engine(model, ps, sp, 80)[1]
    assert any(x.tokens != y.tokens for x, y in zip(base, fused))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("lora", [False, True])
def test_gate_up_gemv_stores_swiglu(fmt: str, lora: bool, monkeypatch) -> None:
    """Qwen3-1.7B's gate/up at batch 1: qmm_swiglu (the GEMV's tiles hold matching gate and up
    rows and store silu(gate) * up) equals the stacked GEMV followed by the SwiGLU kernel, bit
    for bit, with and without the LoRA deltas (h computed in the launch). (NVFP4's batch 1
    runs the mma kernel, without this store, where its operands fit: the GEMV's store is
    tested with that route off.)"""
    from orbit.kernels import _qgemm
    from orbit.kernels.swiglu import silu_mul

    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})

    k, half, r = 2048, 6144, 16
    kw = {"group_size": 128} if fmt == "int4" else {}
    qw = random_qweight(fmt, 2 * half, k, seed=11, device="cuda", **kw)
    g = torch.Generator(device="cuda").manual_seed(11)
    x = torch.randn(1, k, generator=g, device="cuda").bfloat16()
    epi = None
    if lora:
        a = tuple((torch.randn(r, k, generator=g, device="cuda") * 0.02).bfloat16()
                  for _ in range(2))
        b = tuple((torch.randn(half, r, generator=g, device="cuda") * 0.05).bfloat16()
                  for _ in range(2))

        def epi() -> LoRAEpilogue:
            return LoRAEpilogue(torch.empty(1, 2 * r, device="cuda", dtype=torch.bfloat16), b,
                                2.0, a)
    assert dispatch.swiglu_foldable(x, qw)
    full = dispatch.qmm_lora(x, qw, epi()) if lora else dispatch.qmm(x, qw)
    want = silu_mul(full[:, :half], full[:, half:])
    got = dispatch.qmm_swiglu(x, qw, epi() if lora else None)
    assert torch.equal(got, want)
