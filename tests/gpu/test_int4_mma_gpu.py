"""GPU checks of the Gluon INT4 / NVFP4 / FP8 mma.sync decode kernel (orbit/kernels/int4_mma.py).

Fresh random packed weights (every nibble pattern) and activations for every check, NaN-poisoned
outputs, relative norm against x (float64) @ W^T with W the reference dequantization (fp32),
tolerance as the other decode kernels (bf16 output rounding is ~2e-3 relative). Covers M = 1..16
(both MMA column widths), row tails (N not a multiple of the row tile), groups 64 / 128 / 256,
split-K through the in-kernel fix-up (and that its counters re-arm: a second launch gives the
same bits), with and without the register prefetch, 1 and 2 row tiles per warp; NVFP4 on the
same paths, and one-hot rows that must read its dequantized weights exactly; FP8 (e4m3 with
128x128 block scales) likewise, one-hot rows over every code.
Run: `pytest -m gpu tests/gpu/test_int4_mma_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from qmm_check import TOL, check_against_dequant

from orbit.kernels.random_weights import random_qweight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]



@pytest.fixture
def split_pick(monkeypatch):
    """pick_config's split-K pick (int4_mma.WARP_K = 1) for the tests that build another form
    on it (PDL chains, L2 prefetch, rings, chains, staged x, warps along K from its split);
    the default-config tests run the shipped pick."""
    from orbit.kernels import int4_mma

    monkeypatch.setattr(int4_mma, "WARP_K", 1)


def _run(x, qw, cfg=None, out=None):
    from orbit.kernels.int4_mma import int4_mma_weight

    return int4_mma_weight(x, qw, cfg, out)


def _check(m: int, k: int, n: int, group: int, cfg, seed: int, fmt: str = "int4") -> None:
    check_against_dequant(_run, m, k, n, group, cfg, seed, fmt)


@pytest.mark.parametrize("m", [1, 3, 4, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("k,n", [(2048, 6144), (6144, 2048), (4096, 12288), (2048, 200)])
def test_int4_mma_default_config(m: int, k: int, n: int) -> None:
    _check(m, k, n, 128, None, seed=m * 7 + n)


@pytest.mark.parametrize("m", [1, 4, 6, 16, 32])
@pytest.mark.parametrize("fmt,group,k,n", [
    ("int4", 64, 128, 256), ("int4", 64, 256, 128), ("int4", 128, 128, 256),
    ("int4", 128, 256, 512), ("nvfp4", 16, 128, 256), ("nvfp4", 16, 256, 128),
    ("fp8", 128, 128, 256)])
def test_shallow_k_default_config(m: int, fmt: str, group: int, k: int, n: int) -> None:
    """K of one to four steps (MoE experts, small models), at the default config: the pick
    keeps one program per tile there (pick_config's MIN_SLICE_K), the kernel's shallowest
    loops; checked against fp64 as the Qwen3 shapes are."""
    _check(m, k, n, group, None, seed=m + k + n, fmt=fmt)


@pytest.mark.parametrize("cfg", [
    {"split": 1, "prefetch": 0}, {"split": 1, "prefetch": 1}, {"split": 4, "prefetch": 2},
    {"split": 8, "prefetch": 0, "x_prefetch": True}, {"split": 2, "row_tiles": 2},
    {"split": 16, "row_tiles": 2, "prefetch": 2, "x_prefetch": True},
    # the cp.async ring: deeper than the slice (2 steps), as deep, shallower, no scale
    # prefetch, two row tiles
    {"split": 8, "stages": 4}, {"split": 4, "stages": 4}, {"split": 1, "stages": 3},
    {"split": 2, "stages": 2, "prefetch": 0}, {"split": 2, "stages": 4, "prefetch": 2,
                                                "row_tiles": 2, "x_prefetch": True},
])
@pytest.mark.parametrize("m", [2, 16])
def test_int4_mma_configs(cfg: dict, m: int) -> None:
    from orbit.kernels.int4_mma import MmaConfig

    _check(m, 2048, 1000, 128, MmaConfig(**cfg), seed=len(str(cfg)) + m)


@pytest.mark.parametrize("m", [1, 4, 9, 16, 24])
@pytest.mark.parametrize("k,n", [(2048, 6144), (6144, 2048), (2048, 200)])
def test_nvfp4_default_config(m: int, k: int, n: int) -> None:
    """NVFP4 through the same kernel: E2M1 pairs times the e4m3 scale in one packed FMA
    (exact, every code), the global scale in the epilogue."""
    _check(m, k, n, 16, None, seed=m * 5 + n, fmt="nvfp4")


@pytest.mark.parametrize("cfg", [{"split": 1, "prefetch": 0}, {"split": 4, "prefetch": 2},
                                 {"split": 2, "row_tiles": 2, "x_prefetch": True},
                                 {"split": 2, "stages": 3}])
def test_nvfp4_configs(cfg: dict) -> None:
    from orbit.kernels.int4_mma import MmaConfig

    _check(5, 1024, 1000, 16, MmaConfig(**cfg), seed=len(str(cfg)), fmt="nvfp4")


def test_nvfp4_one_hot_rows_read_the_dequantized_weights() -> None:
    """x = rows of the identity: y[j] is column j of W^T, i.e. W[:, j] dequantized, to the
    bf16 rounding of the output (the decode itself is exact: v * s * 2^-9 in bf16)."""
    from orbit.kernels.int4_mma import MmaConfig

    k, n = 256, 128
    qw = random_qweight("nvfp4", n, k, seed=9, device="cuda")
    w = qw.dequantize()  # [n, k] fp32
    for j0 in range(0, 16, 8):
        x = torch.zeros(8, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(8), torch.arange(j0, j0 + 8)] = 1.0
        y = _run(x, qw, MmaConfig())
        assert torch.equal(y, w[:, j0:j0 + 8].T.to(torch.bfloat16))


@pytest.mark.parametrize("m", [1, 3, 4, 9, 16, 32])
@pytest.mark.parametrize("k,n", [(2048, 6144), (6144, 2048), (320, 200)])
def test_fp8_default_config(m: int, k: int, n: int) -> None:
    """FP8 (e4m3, 128x128 block scales) through the same kernel: the bytes decoded to bf16 in
    registers, each 64-deep step's partial times its block's scale; K = 320 ends in half a
    scale block, N = 200 in a partial row block."""
    _check(m, k, n, 128, None, seed=m * 3 + n, fmt="fp8")


@pytest.mark.parametrize("cfg", [{"split": 1, "prefetch": 0}, {"split": 4, "prefetch": 2},
                                 {"split": 2, "row_tiles": 2, "x_prefetch": True},
                                 {"split": 8, "warps": 2}, {"split": 2, "stages": 4}])
def test_fp8_configs(cfg: dict) -> None:
    from orbit.kernels.int4_mma import MmaConfig

    _check(6, 1024, 1000, 128, MmaConfig(**cfg), seed=len(str(cfg)), fmt="fp8")


def test_fp8_one_hot_rows_read_every_code_exactly() -> None:
    """Every e4m3 code but the two NaNs (subnormals, zeros of both signs, +-448) times
    power-of-two block scales: x = rows of the identity must give W[:, j] dequantized bit for
    bit (the decode is exact, and one nonzero product times a power of two rounds nowhere)."""
    from orbit.kernels.int4_mma import MmaConfig
    from orbit.quant.qweight import QuantizedWeight

    n, k = 256, 512
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(0, codes.numel(), (n, k), generator=g)
    idx[:2].copy_(torch.arange(n * k)[: 2 * k].reshape(2, k) % codes.numel())  # all codes
    w = codes[idx].view(torch.float8_e4m3fn).cuda()
    s = torch.exp2(torch.randint(-8, 3, (2, 4), generator=g).float()).cuda()
    qw = QuantizedWeight("fp8", (n, k), {"weight": w, "scale_inv": s}, 128)
    ref = qw.dequantize()  # [n, k] fp32, exact in bf16
    assert torch.equal(ref.to(torch.bfloat16).float(), ref)
    for j0 in range(0, 64, 8):
        x = torch.zeros(8, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(8), torch.arange(j0, j0 + 8) * 7 % k] = 1.0
        for cfg in (MmaConfig(), MmaConfig(split=4, prefetch=2)):
            y = _run(x, qw, cfg)
            assert torch.equal(y, ref[:, torch.arange(j0, j0 + 8) * 7 % k].T.to(torch.bfloat16))


def test_fp8_refuses_misaligned_or_wrong_scales() -> None:
    from orbit.kernels.int4_mma import int4_mma

    qw = random_qweight("fp8", 256, 512, device="cuda")
    x = torch.randn(4, 512, device="cuda").bfloat16()
    w, s = qw.tensors["weight"], qw.tensors["scale_inv"]
    with pytest.raises(ValueError, match="scale must be"):
        int4_mma(x, w, s[:1], 128, fmt="fp8")
    wide = torch.zeros(256, 516, device="cuda", dtype=torch.uint8).view(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="4-byte aligned"):
        int4_mma(x, wide[:, 1:513], s, 128, fmt="fp8")


@pytest.mark.parametrize("group", [64, 256])
def test_int4_mma_groups(group: int) -> None:
    from orbit.kernels.int4_mma import MmaConfig

    for split in (1, 2):
        _check(5, 1024, 384, group, MmaConfig(split=split), seed=group + split)


def test_int4_mma_refuses_what_it_does_not_compute() -> None:
    from orbit.kernels.int4_mma import int4_mma, supports

    qw = random_qweight("int4", 256, 512, group_size=128, device="cuda")
    x = torch.randn(33, 512, device="cuda").bfloat16()
    assert not supports(33, 512, 256, 128, x.dtype, torch.bfloat16, False)
    assert not supports(4, 512, 256, 32, x.dtype, torch.bfloat16, False)
    assert not supports(4, 512, 256, 128, torch.float16, torch.bfloat16, False)
    assert not supports(4, 512, 256, 128, x.dtype, torch.bfloat16, True)
    with pytest.raises(ValueError, match="unsupported"):
        int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "fp8"])
def test_qmm_routes_rows_to_the_mma_kernel(monkeypatch, fmt: str) -> None:
    """Fast-mode forwards within the format's MMA_ROWS go to int4_mma (the same bits as calling
    it) and the epilogue questions answer for that route (no fused SwiGLU / norm there; a LoRA
    delta keeps its fused kernel below MMA_WITH_LORA_MIN_M rows); rows outside it, asymmetric INT4
    codes and a removed entry keep the earlier kernels."""
    from orbit.kernels import _qgemm, dispatch

    # (a deep weight where the format has a K / N rule: _qgemm.MMA_MIN_K_OVER_N)
    k, n = (6144, 2048) if fmt in _qgemm.MMA_MIN_K_OVER_N else (2048, 6144)
    kw = {"group_size": 128} if fmt == "int4" else {}
    qw = random_qweight(fmt, n, k, seed=3, device="cuda", **kw)
    lo, hi = _qgemm.MMA_ROWS[fmt]
    for m in sorted({1, 2, 4, 8, 9, 16} | {lo, hi}):
        x = torch.randn(m, k, device="cuda").bfloat16()
        if lo <= m <= hi:
            assert torch.equal(dispatch.qmm(x, qw), _run(x, qw))
            assert not dispatch.norm_foldable(x, qw)
            # SwiGLU folds there only into the tensor-core kernel's own store (MMA_SWIGLU)
            assert dispatch.swiglu_foldable(x, qw) == dispatch._mma_swiglu(x, qw)
            with monkeypatch.context() as mp:
                mp.setattr(_qgemm, "MMA_SWIGLU", False)
                assert not dispatch.swiglu_foldable(x, qw)
            # a forward with a LoRA delta keeps its fused kernel below MMA_WITH_LORA_MIN_M
            # rows and takes the mma route (nothing fused) from there
            fused = m < _qgemm.MMA_WITH_LORA_MIN_M
            assert dispatch.lora_foldable(x, qw) == (fused and _qgemm.lora_fits(
                m, n, k, fmt, False, x.device))
            assert dispatch.swiglu_foldable(x, qw, lora=True) == (fused and _qgemm.swiglu_fits(
                m, n, k, fmt, False, x.device))
            min_m = _qgemm.MMA_WITH_LORA_MIN_M
            monkeypatch.setattr(_qgemm, "MMA_WITH_LORA_MIN_M", 1)
            assert not dispatch.lora_foldable(x, qw)
            monkeypatch.setattr(_qgemm, "MMA_WITH_LORA_MIN_M", min_m)
        else:
            assert dispatch.lora_foldable(x, qw) == _qgemm.lora_fits(m, n, k, fmt, False,
                                                                     x.device)
    x4 = torch.randn(4, k, device="cuda").bfloat16()
    if fmt == "int4":
        # batch 1: the plane GEMV with its epilogues, unless the mma route starts at 1 row
        # (then the mma kernel's SwiGLU store, where MMA_SWIGLU is on)
        assert dispatch.swiglu_foldable(x4[:1], qw) == (lo > 1 or _qgemm.MMA_SWIGLU)
        asym = random_qweight("int4", n, k, group_size=128, asym=True, seed=4, device="cuda")
        assert not dispatch.mma_operands_ok(x4, asym)
    monkeypatch.delitem(_qgemm.MMA_ROWS, fmt)
    y_old = dispatch.qmm(x4, qw)
    ref = x4.double() @ qw.dequantize().double().T
    assert ((y_old.double() - ref).norm() / ref.norm()).item() < TOL
    assert dispatch.swiglu_foldable(x4, qw) == _qgemm.swiglu_fits(4, n, k, fmt, False,
                                                                   x4.device)


def test_lora_and_epilogues_still_run_where_asked_at_mma_rows() -> None:
    """A launch that asks for a store epilogue at 2..16 rows keeps its fused kernel (the mma
    route takes plain forwards only): qmm_lora on a route that `lora_fits` without mma_ok."""
    from orbit.kernels import _qgemm
    from orbit.kernels.lora_epilogue import LoRAEpilogue

    k, n, r, m = 2048, 2048, 16, 4
    qw = random_qweight("int4", n, k, group_size=128, seed=5, device="cuda")
    if not _qgemm.lora_fits(m, n, k, "int4", False, torch.device("cuda")):
        pytest.skip("no fused LoRA kernel for this shape without the mma route")
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(m, k, generator=g, device="cuda").bfloat16()
    h = (torch.randn(m, r, generator=g, device="cuda") * 0.1).bfloat16()
    b = (torch.randn(n, r, generator=g, device="cuda") * 0.05).bfloat16()
    t = qw.tensors
    y = _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 128, False,
                      False, lora=LoRAEpilogue(h, (b,), 2.0))
    ref = x.double() @ qw.dequantize().double().T + 2.0 * (h.double() @ b.double().T)
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt,m,split,release", [
    ("int4", 4, 4, False), ("int4", 8, 1, False), ("nvfp4", 1, 4, False),
    ("nvfp4", 16, 2, True), ("fp8", 4, 4, True)])
def test_pdl_chain_in_graph_matches_plain_launches(fmt: str, m: int, split: int,
                                                   release: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """int4_mma launched with programmatic dependent launch, each call reading the previous
    one's output (a dependent chain, eager and replayed from a CUDA graph), gives the bits of
    plain launches: the frozen weights' first steps are loaded before the wait, x, the split-K
    workspace and its counters only after it. `release` (pdl.EARLY_RELEASE): each kernel lets
    the next one launch before its own wait."""
    import dataclasses

    from orbit.kernels import pdl as pdl_mod
    from orbit.kernels.int4_mma import pick_config, weight_operands

    if not pdl_mod.pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton with griddepcontrol")
    monkeypatch.setattr(pdl_mod, "EARLY_RELEASE", release)
    d = 2048
    qws = [random_qweight(fmt, d, d, seed=20 + i, device="cuda") for i in range(4)]
    group = weight_operands(qws[0])[2]
    base = dataclasses.replace(pick_config(m, d, d, group, 132, fmt), split=split)
    x0 = torch.randn(m, d, device="cuda").bfloat16()

    def chain(pdl: bool) -> torch.Tensor:
        y = x0
        for qw in qws:  # each output feeds the next call (scaled: keeps the values finite)
            y = _run(y, qw, dataclasses.replace(base, pdl=pdl)) * 0.05
        return y

    from pdl_chain import assert_pdl_chain_matches_plain

    assert torch.isfinite(assert_pdl_chain_matches_plain(chain)).all()


def test_engine_scope_launches_int4_mma_with_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside pdl_scope with USE_PDL on, the wrapper asks for a PDL launch (the grid-size rule
    of pdl.pdl_launch) and the result is the plain launch's bits."""
    from orbit.kernels import int4_mma as mod
    from orbit.kernels import pdl as pdl_mod

    if not pdl_mod.pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton with griddepcontrol")
    qw = random_qweight("int4", 4096, 2048, seed=3, device="cuda", group_size=128)
    x = torch.randn(4, 2048, device="cuda").bfloat16()
    plain = _run(x, qw)
    asked = []
    real = pdl_mod.pdl_launch

    def spy(device, ctas, forced=False):
        kw = real(device, ctas, forced)
        asked.append(kw)
        return kw

    monkeypatch.setattr(pdl_mod, "pdl_launch", spy)
    monkeypatch.setattr(mod, "USE_PDL", True)
    with pdl_mod.pdl_scope(True):
        y = _run(x, qw)
    assert asked and asked[-1].get("launch_pdl") is True
    assert torch.equal(y, plain)


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt,m", [("int4", 1), ("int4", 4), ("int4", 16), ("nvfp4", 4),
                                   ("fp8", 4)])
@pytest.mark.parametrize("k,n", [(4096, 12288), (2048, 200)])
def test_l2_slice_prefetch_gives_the_same_bits(fmt: str, m: int, k: int, n: int) -> None:
    """MmaConfig.l2 (the K slice bulk-prefetched into L2 first) is a hint: the same bits as
    without it, plain and with PDL, at the pick's split and at split 1."""
    import dataclasses

    from orbit.kernels.int4_mma import pick_config, weight_operands

    qw = random_qweight(fmt, n, k, seed=5, device="cuda")
    x = torch.randn(m, k, device="cuda").bfloat16()
    pick = pick_config(m, k, n, weight_operands(qw)[2], 132, fmt)
    for cfg in (pick, dataclasses.replace(pick, split=1), dataclasses.replace(pick, pdl=True)):
        ref = _run(x, qw, dataclasses.replace(cfg, l2=False))
        assert torch.equal(_run(x, qw, dataclasses.replace(cfg, l2=True)), ref), cfg


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 1), ("int4", 128, 4), ("int4", 128, 16),
                                         ("int4", 64, 3), ("nvfp4", 16, 4), ("nvfp4", 16, 9),
                                         ("fp8", 128, 4)])
@pytest.mark.parametrize("k,n", [(4096, 12288), (2048, 1000), (2048, 200)])
def test_tma_ring_gives_the_register_forms_bits(fmt: str, group: int, m: int, k: int,
                                                n: int) -> None:
    """MmaConfig.tma (the words through a TMA ring in shared memory) feeds the MMA the same
    words in the same order as the register prefetch, so the same bits: at the pick, at ring
    depths shallower than, as deep as and deeper than the slice, with row tails (TMA zero-fills
    rows past N; they are never stored), two row tiles, no scale prefetch, and under PDL."""
    import dataclasses

    from orbit.kernels.int4_mma import pick_config, step_depth

    kw = {"group_size": group} if fmt == "int4" else {}
    qw = random_qweight(fmt, n, k, seed=11 + m, device="cuda", **kw)
    x = torch.randn(m, k, device="cuda").bfloat16()
    pick = pick_config(m, k, n, group, 132, fmt)
    steps = k // step_depth(fmt, group)
    cfgs = [pick, dataclasses.replace(pick, split=1), dataclasses.replace(pick, pdl=True),
            dataclasses.replace(pick, prefetch=0), dataclasses.replace(pick, row_tiles=2,
                                                                       x_prefetch=True)]
    for cfg in cfgs:
        depth = steps // cfg.split
        # (rings past ~160 KB of shared memory do not launch: 2 row tiles at split 1)
        for tma in sorted(t for t in {2, 4, depth, depth + 2}
                          if t * cfg.block_n * 64 <= 160 * 1024):
            ref = _run(x, qw, cfg)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            got = _run(x, qw, dataclasses.replace(cfg, tma=tma), out=out)
            assert torch.equal(got, ref), (cfg, tma)
    _check(m, k, n, group, dataclasses.replace(pick, tma=3), seed=3, fmt=fmt)


def test_tma_ring_refuses_misaligned_words_and_two_rings() -> None:
    from orbit.kernels.int4_mma import MmaConfig, int4_mma

    qw = random_qweight("int4", 256, 2048, seed=1, device="cuda", group_size=128)
    x = torch.randn(2, 2048, device="cuda").bfloat16()
    q, s = qw.tensors["qweight"], qw.tensors["scale"]
    with pytest.raises(ValueError, match="two rings"):
        int4_mma(x, q, s, 128, MmaConfig(tma=2, stages=2))
    wide = torch.zeros(256, 2048 // 8 + 1, dtype=torch.int32, device="cuda")
    wide[:, : 2048 // 8] = q
    with pytest.raises(ValueError, match="16-byte aligned"):
        int4_mma(x, wide[:, : 2048 // 8], s, 128, MmaConfig(tma=2))


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 4, 9, 16])
@pytest.mark.parametrize("k,n", [(4096, 12288), (6144, 2048), (2048, 200)])
def test_two_mma_chains_per_step(fmt: str, m: int, k: int, n: int) -> None:
    """MmaConfig.chains = 2 (two independent MMA chains per step: INT4 sums them before the
    scale, NVFP4 keeps two accumulators) against the fp64 reference at the pick, 2 row tiles,
    split 1, PDL and the TMA ring; its refusals (FP8, INT4 groups of 64)."""
    import dataclasses

    from orbit.kernels.int4_mma import MmaConfig, int4_mma, pick_config

    group = 16 if fmt == "nvfp4" else 128
    pick = dataclasses.replace(pick_config(m, k, n, group, 132, fmt), chains=2)
    for i, cfg in enumerate((pick, dataclasses.replace(pick, row_tiles=3 - pick.row_tiles),
                             dataclasses.replace(pick, split=1, prefetch=2),
                             dataclasses.replace(pick, pdl=True),
                             dataclasses.replace(pick, tma=2))):
        _check(m, k, n, group, cfg, seed=m + i, fmt=fmt)
    qw = random_qweight("fp8", 256, 2048, seed=1, device="cuda")
    x = torch.randn(2, 2048, device="cuda").bfloat16()
    from orbit.kernels.int4_mma import weight_operands

    q, sc, g, _ = weight_operands(qw)
    with pytest.raises(ValueError, match="chains"):
        int4_mma(x, q, sc, g, MmaConfig(chains=2), fmt="fp8")
    q64 = random_qweight("int4", 256, 2048, seed=1, device="cuda", group_size=64)
    with pytest.raises(ValueError, match="chains"):
        int4_mma(x, q64.tensors["qweight"], q64.tensors["scale"], 64, MmaConfig(chains=2))


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 64), ("nvfp4", 16), ("fp8", 128)])
@pytest.mark.parametrize("m", [3, 16])
@pytest.mark.parametrize("k,n", [(4096, 12288), (2048, 200)])
def test_x_staged_in_shared_memory_gives_the_register_forms_bits(fmt: str, group: int, m: int,
                                                                 k: int, n: int) -> None:
    """MmaConfig.x_smem (the program's x slice staged once in shared memory, in the MMA's K
    order): the same B operand values into the same MMAs in the same order, so the output
    is bit for bit the register form's: at the pick; with PDL and two chains (where the
    format has them); with the TMA ring at the other row tiling. The fp64 reference holds
    (rows past M and a partial row tile included)."""
    import dataclasses

    from orbit.kernels.int4_mma import chains_fit, pick_config, x_smem_fits

    kw = {"group_size": group} if fmt == "int4" else {}
    qw = random_qweight(fmt, n, k, seed=m + k, device="cuda", **kw)
    x = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(m)
                    ).bfloat16()
    pick = dataclasses.replace(pick_config(m, k, n, group, 132, fmt), x_smem=False)
    forms = [pick, dataclasses.replace(pick, pdl=True, chains=2 if chains_fit(fmt, group) else 1),
             dataclasses.replace(pick, tma=2, row_tiles=3 - pick.row_tiles)]
    compared = 0
    for cfg in forms:
        if not x_smem_fits(m, k // cfg.split):
            continue
        ref = _run(x, qw, cfg)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        got = _run(x, qw, dataclasses.replace(cfg, x_smem=True), out=out)
        assert torch.equal(got, ref), (fmt, group, m, k, n, cfg)
        compared += 1
    assert compared, "no form's slice fits: the test compared nothing"
    if x_smem_fits(m, k // pick.split):
        _check(m, k, n, group, dataclasses.replace(pick, x_smem=True), seed=5, fmt=fmt)


@pytest.mark.usefixtures("split_pick")
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 64), ("nvfp4", 16), ("fp8", 128)])
@pytest.mark.parametrize("m", [1, 4, 9, 16])
@pytest.mark.parametrize("k,n", [(4096, 12288), (6144, 2048), (2048, 200)])
def test_warps_along_k(fmt: str, group: int, m: int, k: int, n: int) -> None:
    """MmaConfig.kw (each warp of a program runs the K loop over its own part of the slice,
    the parts summed in shared memory) against the fp64 reference: 2, 4 and 8 parts, in
    place of the pick's split and on top of it, 1, 2 and 4 row tiles, both prefetch depths,
    x prefetch, PDL; a partial row tile (N = 200). A warp that read another part's x or
    scales would be off by far more than the tolerance."""
    import dataclasses

    from orbit.kernels.int4_mma import kw_fits, pick_config, warps_along_k

    pick = pick_config(m, k, n, group, 132, fmt)
    forms = []
    for kw in (2, 4, 8):
        forms += [warps_along_k(pick, kw, max(1, pick.split // kw)),
                  dataclasses.replace(warps_along_k(pick, kw, pick.split),
                                      row_tiles=3 - pick.row_tiles, prefetch=2),
                  dataclasses.replace(warps_along_k(pick, kw, 1), prefetch=0, x_prefetch=True,
                                      pdl=True)]
    # four 16-row tiles a warp (one x load shared by 64 weight rows; bench_qmm's "wide" forms)
    forms.append(dataclasses.replace(warps_along_k(pick, 4, 1), row_tiles=4))
    checked = 0
    for i, cfg in enumerate(forms):
        if kw_fits(cfg, k, group, fmt):
            _check(m, k, n, group, cfg, seed=m + 3 * i, fmt=fmt)
            checked += 1
    assert checked >= 3, f"only {checked} kw forms fit: the test checked too little"


def test_warps_along_k_refuses_what_it_does_not_run() -> None:
    from orbit.kernels.int4_mma import MmaConfig

    qw = random_qweight("int4", 256, 2048, seed=2, device="cuda", group_size=128)
    x = torch.randn(2, 2048, device="cuda").bfloat16()
    for bad in (MmaConfig(warps=1, kw=3), MmaConfig(warps=1, kw=4, tma=2),
                MmaConfig(warps=1, kw=8, split=4)):  # (8 parts of a 512-deep slice: 64 deep)
        with pytest.raises(ValueError, match="kw"):
            _run(x, qw, bad)
