"""GPU checks of the decode GEMV / split-K path (orbit/kernels/gemv.py) at real decode shapes.

Fresh random packed weights and activations for every check, NaN-poisoned outputs, relative
norm against `x (float64) @ W^T` with W the reference dequantization rounded to the activation
dtype (exactly the weight the tile kernel multiplies; the 4-bit formats' nibble-plane kernel
multiplies the unrounded weights, within the same tolerance) and against `qmm_reference`. Also checks that
`qmm` sends fast-mode forward calls with M <= GEMV_MAX_M through the GEMV and exact mode,
input gradients and larger M do not. Run: `pytest -m gpu tests/gpu/test_kernels_gemv_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from orbit.kernels.dispatch import qmm, qmm_reference, qmm_t
from orbit.kernels.random_weights import random_qweight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (in, out): SmolLM2-135M q/o, up/gate, down, k/v; Qwen3-1.7B up/gate, down, q; 4096x12288.
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192),
          (2048, 6144), (6144, 2048), (2048, 4096), (4096, 12288)]
MS = (1, 2, 4, 8, 16)
TOL = 1e-2  # as tests/gpu/test_kernels_qmm_gpu.py: bf16 output rounding is ~2e-3 relative


def _variants(k: int) -> list[tuple[str, dict]]:
    g = 128 if k % 128 == 0 else 64
    return [("int4", {"group_size": 32}), ("int4", {"group_size": g}),
            ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}),
            ("int8", {"group_size": 32}), ("fp8", {}), ("nvfp4", {}), ("mxfp4", {})]


def _args(qw) -> tuple:
    """(q, s, offset, global_scale, group) as the wrappers pass them to launch/gemv."""
    t = qw.tensors
    q, s = t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if qw.fmt == "nvfp4" else None
    group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(qw.fmt, qw.group_size)
    return q, s, t.get("offset"), gs, group


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("k,n", SHAPES)
def test_gemv_decode_shapes_all_formats(k: int, n: int) -> None:
    """gemv() with the heuristic config, as launch() calls it (whatever GEMV_MAX_M is)."""
    from orbit.kernels.gemv import gemv

    gen = torch.Generator(device="cuda").manual_seed(k * 7 + n)
    for i, (fmt, kw) in enumerate(_variants(k)):
        qw = random_qweight(fmt, n, k, seed=31 * k + n + i, device="cuda", **kw)
        w = qw.dequantize(torch.bfloat16).double()
        for m in MS:
            x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
            y = gemv(x, fmt, qw.shape, *_args(qw),
                     torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16))
            torch.cuda.synchronize()
            assert not y.isnan().any(), ("unwritten (NaN) outputs", fmt, kw, k, n, m)
            e64, eref = _rel(y, x.double() @ w.T), _rel(y, qmm_reference(x, qw))
            assert e64 < TOL and eref < TOL, (fmt, kw, k, n, m, e64, eref)


@pytest.mark.parametrize("k,n", [(576, 1536), (6144, 2048), (4096, 12288)])
@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 64}), ("fp8", {}), ("nvfp4", {})])
def test_gemv_split_k_on_and_off(k: int, n: int, fmt: str, kw: dict) -> None:
    """Forced split = 1 and split = 4 agree with the reference; split-K is deterministic.
    (int4 group 64: 576 is not a multiple of 128.)"""
    from orbit.kernels.gemv import GemvConfig, gemv

    qw = random_qweight(fmt, n, k, seed=k + n, device="cuda", **kw)
    w = qw.dequantize(torch.bfloat16).double()
    for m in (1, 3, 16):
        x = torch.randn(m, k, device="cuda").bfloat16()
        for split in (1, 4):
            cfg = GemvConfig(block_n=32 if m <= 4 else 16, block_k=128, split=split, warps=4,
                             stages=3)
            ys = [gemv(x, fmt, qw.shape, *_args(qw),
                       torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16),
                       cfg) for _ in range(2)]
            assert not ys[0].isnan().any(), (fmt, k, n, m, split)
            assert torch.equal(ys[0], ys[1]), ("not deterministic", fmt, k, n, m, split)
            assert _rel(ys[0], x.double() @ w.T) < TOL, (fmt, k, n, m, split)


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 128}), ("fp8", {}), ("nvfp4", {})])
def test_gemv_split_k_fixup_eager_graph_and_stream(fmt: str, kw: dict) -> None:
    """The in-kernel split-K fix-up (last-arriving program adds the slices) gives the bits of
    the two-launch path, eagerly, in 20 replays of a captured CUDA graph (the arrival counters
    re-arm themselves), and on a side stream (its own counters)."""
    from orbit.kernels.gemv import GemvConfig, gemv

    k, n, m = 6144, 2048, 1
    qw = random_qweight(fmt, n, k, seed=11, device="cuda", **kw)
    cfg = dict(block_n=32, block_k=256 if fmt != "fp8" else 128, split=8, warps=4, stages=3)
    x = torch.randn(m, k, device="cuda").bfloat16()

    def run(fixup: bool) -> torch.Tensor:
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        return gemv(x, fmt, qw.shape, *_args(qw), y, GemvConfig(**cfg, fixup=fixup))

    ref = run(False)
    assert not ref.isnan().any()
    assert torch.equal(run(True), ref)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side = run(True)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y_side, ref)
    y_g = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv(x, fmt, qw.shape, *_args(qw), y_g, GemvConfig(**cfg, fixup=True))
    for i in range(20):
        x.copy_(torch.randn(m, k, device="cuda").bfloat16())
        y_g.fill_(float("nan"))
        graph.replay()
        assert torch.equal(y_g, run(False)), ("replay", i)


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 128}),
                                    ("int4", {"group_size": 32, "asym": True, "offset_dtype": torch.float32}),
                                    ("int4", {"group_size": 64}), ("nvfp4", {}), ("mxfp4", {})])
def test_plane_kernel_deferred_matches_per_step(fmt: str, kw: dict) -> None:
    """The plane kernel's deferred reduction and in-place int4 decode (inline PTX on CUDA,
    GemvConfig.defer), with and without the x prefetch, computes what the per-step version
    does, on fresh inputs, at M = 1, 3, 16, with and without split-K; every output written;
    the prefetch changes only when x is loaded, so not a bit of the result."""
    from orbit.kernels.gemv import GemvConfig, gemv

    for k, n in [(4096, 12288), (6144, 2048)]:
        qw = random_qweight(fmt, n, k, seed=k + 3 * n, device="cuda", **kw)
        w = qw.dequantize(torch.bfloat16).double()
        for m in (1, 3, 16):
            x = torch.randn(m, k, device="cuda").bfloat16()
            for split in (1, 4):
                ys = []
                for defer, xpre in ((False, False), (True, False), (True, True)):
                    cfg = GemvConfig(block_n=32 if m <= 4 else 16, block_k=512, split=split,
                                     warps=4, stages=3, defer=defer, x_prefetch=xpre)
                    ys.append(gemv(x, fmt, qw.shape, *_args(qw), torch.full(
                        (m, n), float("nan"), device="cuda", dtype=torch.bfloat16), cfg))
                ref = x.double() @ w.T
                for y in ys[1:]:
                    assert not y.isnan().any(), (fmt, kw, k, n, m, split)
                    assert _rel(y, ref) < TOL, (fmt, kw, k, n, m, split, _rel(y, ref))
                    assert _rel(y, ys[0].double()) < TOL, (fmt, kw, k, n, m, split)
                assert torch.equal(ys[1], ys[2]), ("x prefetch changed the sums", fmt, k, n, m)


def test_gemv_fp16_activations() -> None:
    from orbit.kernels.gemv import gemv

    qw = random_qweight("int4", 6144, 2048, group_size=128, seed=5, device="cuda")
    x = torch.randn(3, 2048, device="cuda").half()
    y = gemv(x, "int4", qw.shape, *_args(qw),
             torch.full((3, 6144), float("nan"), device="cuda", dtype=torch.float16))
    assert not y.isnan().any()
    assert y.dtype == torch.float16
    assert _rel(y, x.double() @ qw.dequantize(torch.float16).double().T) < TOL


def test_dispatch_routes_small_m_fast_mode_through_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    # The rules alone (GEMV_MAX_M is theirs): a route table shipped for this GPU (the H100's
    # names the GEMV at M = 1 itself) would override them.
    from orbit.kernels.qmm_routes import ROUTES

    with ROUTES.scoped(None):
        _dispatch_routes_small_m(monkeypatch)


def _dispatch_routes_small_m(monkeypatch: pytest.MonkeyPatch) -> None:
    from orbit.kernels import _qgemm, gemv

    calls: list[int] = []
    orig = gemv.gemv

    def counting(*a, **kw):
        calls.append(a[0].shape[0])
        return orig(*a, **kw)

    monkeypatch.setattr(gemv, "gemv", counting)  # launch() imports it at each call
    # the GEMV's own routing: without the mma route, which takes NVFP4's M = 1 first
    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})
    max_m = _qgemm.GEMV_MAX_M
    k, n = 6144, 2048  # narrow out, long in: split-K deep enough that M=1 takes the GEMV
    for fmt, kw in [("int4", {"group_size": 128}), ("int8", {"group_size": 32}), ("fp8", {}),
                    ("nvfp4", {}), ("mxfp4", {})]:
        qw = random_qweight(fmt, n, k, seed=1, device="cuda", **kw)
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").bfloat16()
            calls.clear()
            y = qmm(x, qw)
            want = _qgemm.use_gemv(m, n, k, fmt, x.device)
            assert want == (m == 1), (fmt, m, "use_gemv on 6144->2048")
            assert calls == ([m] if want else []), (fmt, m, max_m, "routing")
            calls.clear()
            ye = qmm(x, qw, exact=True)
            qmm_t(torch.randn(m, n, device="cuda").bfloat16(), qw)
            qmm(torch.randn(17, k, device="cuda").bfloat16(), qw)
            assert calls == [], (fmt, m, "exact / transpose / M=17 went through the GEMV")
            assert _rel(y, ye) < TOL
        monkeypatch.setattr(_qgemm, "GEMV_MAX_M", 0)
        qmm(torch.randn(1, k, device="cuda").bfloat16(), qw)
        assert calls == [], "GEMV_MAX_M = 0 must disable the GEMV"
        monkeypatch.setattr(_qgemm, "GEMV_MAX_M", max_m)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_plane_e2m1_from_fp32_bits(fmt: str) -> None:
    """GemvConfig.e2m1 1 and 2 (E2M1 built as fp32 bits, not via an fp16 convert) against the
    reference and against the default decode, at real decode shapes; e2m1 = 2 (NVFP4) gives
    the default decode's bits (every product and sum moved by exact powers of two)."""
    from orbit.kernels.gemv import GemvConfig, gemv

    for k, n in [(2048, 6144), (6144, 2048), (4096, 12288)]:
        qw = random_qweight(fmt, n, k, seed=k + n, device="cuda")
        w = qw.dequantize(torch.bfloat16).double()
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda").bfloat16()
            ys = [gemv(x, fmt, qw.shape, *_args(qw),
                       torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16),
                       GemvConfig(32, 256, 1, 4, 3, e2m1=e2m1)) for e2m1 in (0, 1, 2)]
            for y in ys[1:]:
                assert not y.isnan().any(), (fmt, k, n, m)
                assert _rel(y, x.double() @ w.T) < TOL, (fmt, k, n, m)
                assert _rel(y, ys[0]) < 2e-3, (fmt, k, n, m)  # same sums, other rounding
            if fmt == "nvfp4":
                assert torch.equal(ys[2], ys[0]), (k, n, m)


@pytest.mark.parametrize("k,n", [(576, 1536), (2048, 6144), (6144, 2048), (4096, 12288)])
def test_fp8_gemv_both_decodes(k: int, n: int) -> None:
    """orbit/kernels/gemv_fp8.py at decode shapes, M = 1..4, both e4m3 decodes (Triton's
    convert; integer bits with fp32 subnormals), split or not: fp32 outputs equal x (float64)
    @ W^T up to summation order (W = the exact e4m3 value * block scale), bf16 outputs within
    the usual rounding; every output written."""
    from orbit.kernels.gemv_fp8 import Fp8GemvConfig, gemv_fp8, pick_fp8_gemv_config

    qw = random_qweight("fp8", n, k, seed=k + n, device="cuda")
    q, s = qw.tensors["weight"], qw.tensors["scale_inv"]
    q.view(torch.uint8)[0, :126] = torch.arange(126, dtype=torch.uint8, device="cuda")  # subnormals too
    w = qw.dequantize(torch.float32).double()
    for m in (1, 2, 3, 4):
        x = torch.randn(m, k, device="cuda").bfloat16()
        ref = x.double() @ w.T
        auto = pick_fp8_gemv_config(m, n, k, 132)
        for cfg in (auto, Fp8GemvConfig(dec=0, split=auto.split, block_k=auto.block_k),
                    Fp8GemvConfig(block_n=16, block_k=128, split=3)):
            for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, TOL)):
                y = gemv_fp8(x, q, s, torch.full((m, n), float("nan"), device="cuda",
                                                 dtype=dtype), cfg)
                assert not y.isnan().any(), (k, n, m, cfg)
                assert _rel(y, ref) < tol, (k, n, m, cfg, dtype, _rel(y, ref))


@pytest.mark.parametrize("fmt,kw,wpre,release", [
    ("int4", {"group_size": 128}, 0, False), ("fp8", {}, 0, False), ("nvfp4", {}, 0, False),
    ("int4", {"group_size": 128}, 1, False), ("int4", {"group_size": 128}, 2, True),
    ("nvfp4", {}, 2, True), ("fp8", {}, 2, True)])
def test_pdl_chain_in_graph_matches_plain_launches(fmt: str, kw: dict, wpre: int,
                                                   release: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """GEMVs launched with programmatic dependent launch, each reading the previous one's
    output (a dependent chain, eager and replayed from a CUDA graph), give the bits of plain
    launches: pdl_enter waits for the previous kernel before any load or store of what an
    earlier kernel writes. `wpre` (GemvConfig.w_preload): the first steps' frozen weights are
    loaded before the wait; `release` (pdl.EARLY_RELEASE): each kernel releases the next before
    its own wait (a deeper chain)."""
    import dataclasses

    from orbit.kernels import pdl as pdl_mod
    from orbit.kernels.gemv import gemv, num_sms, pick_gemv_config
    from orbit.kernels.gemv_fp8 import pick_fp8_gemv_config
    from orbit.kernels.pdl import pdl_available

    if not pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton with griddepcontrol")
    monkeypatch.setattr(pdl_mod, "EARLY_RELEASE", release)
    d = 2048
    qws = [random_qweight(fmt, d, d, seed=i, device="cuda", **kw) for i in range(4)]
    auto = (pick_fp8_gemv_config(1, d, d, num_sms(torch.device("cuda"))) if fmt == "fp8"
            else pick_gemv_config(1, d, d, fmt, num_sms(torch.device("cuda"))))
    x0 = torch.randn(1, d, device="cuda").bfloat16()

    def chain(pdl: bool) -> torch.Tensor:
        y = x0
        for qw in qws:
            cfg = dataclasses.replace(auto, pdl=pdl)
            if wpre:
                cfg = dataclasses.replace(cfg, w_preload=wpre)
            y = gemv(y, fmt, qw.shape, *_args(qw), torch.empty_like(y), cfg)
        return y

    from pdl_chain import assert_pdl_chain_matches_plain

    assert_pdl_chain_matches_plain(chain)
