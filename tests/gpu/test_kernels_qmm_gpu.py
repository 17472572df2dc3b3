"""GPU checks of the fused dequantize-GEMM kernels against the float64 reference.

Every check draws fresh random packed weights and activations, poisons the output with NaN
first (so every element is proved written), and compares by relative norm against
`x (float64) @ W^T` where W is the reference dequantization rounded to the activation dtype,
which is exactly the weight the kernel multiplies. Run: `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from orbit.kernels.dispatch import qmm, qmm_t
from orbit.kernels.random_weights import random_qweight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (in, out): SmolLM2-135M q/o, up/gate, down, k/v; Qwen3-1.7B/4B/8B MLP up.
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192),
          (2048, 6144), (2560, 9728), (4096, 12288)]
SMALL_SHAPES = SHAPES[:4]
TOL = 1e-2  # bf16 output rounding is ~2e-3 relative; summation order adds less


def _variants(k: int) -> list[tuple[str, dict]]:
    g = 128 if k % 128 == 0 else 64
    return [("int4", {"group_size": 32}), ("int4", {"group_size": g}),
            ("int4", {"group_size": 64, "asym": True}), ("int8", {"group_size": 32}),
            ("fp8", {}), ("nvfp4", {}), ("mxfp4", {})]


def _kernel(fmt: str):
    from orbit.kernels import _qgemm, fp4, fp8, int4, int8

    return {"int4": int4.int4_matmul, "int8": int8.int8_matmul, "fp8": fp8.fp8_matmul,
            "nvfp4": fp4.nvfp4_matmul, "mxfp4": fp4.mxfp4_matmul, "bf16": _qgemm.bf16_matmul}[fmt]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


def _check_one(fmt: str, kw: dict, k: int, n: int, m: int, seed: int, exact: bool,
               dtype: torch.dtype = torch.bfloat16) -> None:
    qw = random_qweight(fmt, n, k, seed=seed, device="cuda", **kw)
    w = qw.dequantize(dtype).double()  # [n, k], the weight the kernel multiplies
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
    dy = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    fn = _kernel(fmt)
    y = fn(x, qw, exact=exact, out=torch.full((m, n), float("nan"), device="cuda", dtype=dtype))
    dx = fn(dy, qw, transpose=True, exact=exact,
            out=torch.full((m, k), float("nan"), device="cuda", dtype=dtype))
    assert not y.isnan().any() and not dx.isnan().any(), "unwritten (NaN) outputs"
    e_y, e_dx = _rel(y, x.double() @ w.T), _rel(dx, dy.double() @ w)
    assert e_y < TOL and e_dx < TOL, (fmt, kw, k, n, m, e_y, e_dx)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 16, 77])
def test_decode_shapes_all_formats(k: int, n: int, m: int) -> None:
    for i, (fmt, kw) in enumerate(_variants(k)):
        _check_one(fmt, kw, k, n, m, seed=1000 * m + i, exact=False)


@pytest.mark.parametrize("k,n", SMALL_SHAPES + [(2048, 6144)])
@pytest.mark.parametrize("m", [300, 2048])
def test_training_shapes_all_formats(k: int, n: int, m: int) -> None:
    for i, (fmt, kw) in enumerate(_variants(k)):
        _check_one(fmt, kw, k, n, m, seed=7 * m + i, exact=False)
        _check_one(fmt, kw, k, n, m, seed=7 * m + i, exact=True)


def test_fp16_activations() -> None:
    _check_one("int4", {"group_size": 128}, 2048, 6144, 33, seed=5, exact=False,
               dtype=torch.float16)


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 128}), ("int4", {"group_size": 32, "asym": True}),
                                    ("int8", {"group_size": 32}), ("fp8", {}), ("nvfp4", {}),
                                    ("mxfp4", {}), ("bf16", {})])
def test_exact_rows_do_not_depend_on_batch(fmt: str, kw: dict) -> None:
    k, n = 2048, 6144
    qw = random_qweight(fmt, n, k, seed=11, device="cuda", **kw)
    x = torch.randn(700, k, device="cuda").bfloat16()
    dy = torch.randn(700, n, device="cuda").bfloat16()
    y, dx = qmm(x, qw, exact=True), qmm_t(dy, qw, exact=True)
    # slices below and above EXACT_DECODE_MAX_M: both exact tiles must give the same bits
    for lo, hi in [(0, 1), (5, 6), (699, 700), (3, 20), (0, 128), (64, 193), (64, 300), (1, 699)]:
        assert torch.equal(qmm(x[lo:hi], qw, exact=True), y[lo:hi]), (fmt, lo, hi)
        assert torch.equal(qmm_t(dy[lo:hi], qw, exact=True), dx[lo:hi]), (fmt, lo, hi)


def test_act_quant_matches_reference_bitwise() -> None:
    from orbit.kernels.fp8 import act_quant_fp8, act_quant_fp8_reference

    x = (torch.randn(333, 2560, device="cuda") * torch.rand(333, 1, device="cuda") * 10).bfloat16()
    x[7, 128:256] = 0  # an all-zero group takes the amax floor
    xq, sx = act_quant_fp8(x)
    xr, sr = act_quant_fp8_reference(x)
    assert torch.equal(sx, sr)
    assert torch.equal(xq.view(torch.uint8), xr.view(torch.uint8))


@pytest.mark.parametrize("k,n", [(576, 576), (576, 192), (2048, 6144), (4096, 12288)])
@pytest.mark.parametrize("m", [1, 200, 4096])
def test_w8a8_against_reference(k: int, n: int, m: int) -> None:
    from orbit.kernels.fp8 import act_quant_fp8_reference, w8a8_matmul

    qw = random_qweight("fp8", n, k, seed=m + n, device="cuda")
    x = torch.randn(m, k, device="cuda").bfloat16()
    y = w8a8_matmul(x, qw, out=torch.full((m, n), float("nan"), device="cuda",
                                          dtype=torch.bfloat16))
    assert not y.isnan().any()
    xq, sx = act_quant_fp8_reference(x)
    xd = xq.double() * sx.double().repeat_interleave(128, dim=1)[:, :k]
    ref = xd @ qw.dequantize().double().T
    assert _rel(y, ref) < TOL
    # and the quantization itself stays within e4m3's error of the bf16 product
    assert _rel(y, x.double() @ qw.dequantize().double().T) < 0.08


def test_w8a8_exact_rows_do_not_depend_on_batch() -> None:
    qw = random_qweight("fp8", 6144, 2048, seed=3, device="cuda")
    x = torch.randn(500, 2048, device="cuda").bfloat16()
    y = qmm(x, qw, exact=True, act_quant="fp8")
    for lo, hi in [(0, 1), (499, 500), (17, 300)]:
        assert torch.equal(qmm(x[lo:hi], qw, exact=True, act_quant="fp8"), y[lo:hi])


def test_dispatch_routes_cuda_to_kernels_and_matches_cpu_reference() -> None:
    qw = random_qweight("int4", 576, 576, group_size=64, seed=2)
    x = torch.randn(9, 576).bfloat16()
    y_cpu = qmm(x, qw)
    y_gpu = qmm(x.cuda(), qw.to("cuda"))
    assert _rel(y_gpu.cpu(), y_cpu.double()) < TOL


@pytest.mark.parametrize("sd,od", [(torch.bfloat16, torch.float32),
                                   (torch.float16, torch.float16),
                                   (torch.float16, torch.bfloat16)])
def test_int4_offset_dtype_independent_of_scale(sd: torch.dtype, od: torch.dtype) -> None:
    """quantize() stores a bf16 scale with an fp32 offset, GGUF Q4_1 fp16 with fp16."""
    kw = {"group_size": 32, "asym": True, "scale_dtype": sd, "offset_dtype": od}
    for m in (1, 77, 2048):  # 2048: the dequantize-then-cuBLAS path
        _check_one("int4", kw, 576, 1536, m, seed=m, exact=False)
    _check_one("int4", kw, 576, 1536, 77, seed=3, exact=True)


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 32}), ("int4", {"group_size": 128,
                                    "asym": True}), ("int8", {"group_size": 32}), ("fp8", {}),
                                    ("nvfp4", {}), ("mxfp4", {}),
                                    ("int4", {"group_size": 64, "asym": True,
                                              "offset_dtype": torch.float32})])
def test_tile_dequantization_is_bit_exact(fmt: str, kw: dict) -> None:
    """The kernels' weights equal the reference's BF16 weights exactly (via the dequant kernel,
    which runs the same tile loaders as the GEMM)."""
    from orbit.kernels._qgemm import dequantize_weight

    qw = random_qweight(fmt, 1000, 2048, seed=4, device="cuda", **kw)
    t = qw.tensors
    q = t.get("qweight", t.get("weight"))
    s = t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
    group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(fmt, qw.group_size)
    w = dequantize_weight(fmt, qw.shape, q, s, t.get("offset"), gs, group, torch.bfloat16)
    assert torch.equal(w, qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 128}),
                                    ("int4", {"group_size": 32, "asym": True}),
                                    ("int8", {"group_size": 32}), ("fp8", {}), ("nvfp4", {}),
                                    ("mxfp4", {})])
def test_swap_ab_forward(fmt: str, kw: dict) -> None:
    """TileConfig.swap (y^T = W x^T, the decode experiment) against the reference, NaN-poisoned
    outputs, M on both sides of the 16-row MMA tile."""
    from orbit.kernels import _qgemm

    k, n = 2048, 6144
    qw = random_qweight(fmt, n, k, seed=3, device="cuda", **kw)
    t = qw.tensors
    q, s = t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
    group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(fmt, qw.group_size)
    w = qw.dequantize(torch.bfloat16).double()
    for m, bm in [(1, 16), (5, 16), (16, 16), (40, 64)]:
        for bo, br in [(64, 64), (128, 128)]:
            x = torch.randn(m, k, device="cuda").bfloat16()
            y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            cfg = _qgemm.TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=3, swap=True)
            _qgemm.launch(x, fmt, qw.shape, q, s, t.get("offset"), gs, group, False, False, y,
                          cfg)
            assert not y.isnan().any(), (fmt, m, bo, br)
            assert _rel(y, x.double() @ w.T) < TOL, (fmt, m, bo, br)


def _check_plane_pairs(fmt: str, kw: dict, dtype: torch.dtype, seed: int) -> None:
    """TileConfig.unpack = 3 for one format: one-hot x rows read single weights back, which
    must be the dequantized weights bit for bit (no sum, so only the decode is tested); random
    x against float64 x @ W^T; NaN-poisoned outputs; M on both sides of the 16-row MMA tile;
    pipelined and register-fed tiles (one stage: swapped, split or not, and unswapped 16-row
    mma.sync), split-K or not, a K tail (2176 at br 256)."""
    from orbit.kernels import _qgemm
    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS

    cfgs = [{"bo": 32, "br": 128, "stages": 4}, {"bo": 64, "br": 256, "stages": 3, "split": 4},
            {"bo": 64, "br": 256, "stages": 1, "swap": True},
            {"bo": 128, "br": 128, "stages": 1, "swap": True, "split": 4},
            {"bo": 64, "br": 256, "stages": 1, "split": 2}]
    for k, n in [(2048, 6144), (6144, 2048), (2176, 1024)]:
        qw = random_qweight(fmt, n, k, seed=k + n + seed, device="cuda", **kw)
        t = qw.tensors
        gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
        wb = qw.dequantize(dtype)
        for c in cfgs:
            cfg = _qgemm.TileConfig(bm=16, warps=4, unpack=UNPACK_PLANE_PAIRS, **c)

            def run(x: torch.Tensor, qw=qw, t=t, n=n, cfg=cfg, gs=gs) -> torch.Tensor:
                y = torch.full((x.shape[0], n), float("nan"), device="cuda", dtype=dtype)
                return _qgemm.launch(x, fmt, qw.shape, t["qweight"], t["scale"],
                                     t.get("offset"), gs, qw.group_size, False, False, y, cfg)

            cols = torch.arange(16, device="cuda") * (k // 16) + torch.arange(16, device="cuda") % 8
            onehot = torch.zeros(16, k, device="cuda", dtype=dtype)
            onehot[torch.arange(16), cols] = 1.0
            assert torch.equal(run(onehot), wb[:, cols].T.contiguous()), (fmt, k, n, kw, cfg)
            for m in (1, 5, 16, 33):
                x = torch.randn(m, k, device="cuda").to(dtype)
                y = run(x)
                assert not y.isnan().any(), (fmt, k, n, m, cfg)
                assert _rel(y, x.double() @ wb.double().T) < TOL, (fmt, k, n, m, kw, cfg)


@pytest.mark.parametrize("kw", [{"group_size": 128}, {"group_size": 32, "asym": True},
                                {"group_size": 64, "scale_dtype": torch.float32}])
def test_plane_pair_steps(kw: dict) -> None:
    """INT4 over nibble-plane pairs: the bf16x2 inline-asm decode where codes are symmetric and
    the scale bf16, the plain decode otherwise (see _check_plane_pairs)."""
    _check_plane_pairs("int4", kw, torch.bfloat16, 0)


@pytest.mark.parametrize(("fmt", "dtype"), [("nvfp4", torch.bfloat16), ("nvfp4", torch.float16),
                                           ("mxfp4", torch.bfloat16)])
def test_fp4_plane_pair_steps(fmt: str, dtype: torch.dtype) -> None:
    """NVFP4 / MXFP4 over nibble-plane pairs (NVFP4 with bf16 x: the E2M1 bf16x2 inline-asm
    decode, whose subnormal codes must survive the packed FMA; otherwise the plain decode;
    NVFP4's global scale through the epilogue; see _check_plane_pairs)."""
    _check_plane_pairs(fmt, {}, dtype, 1)
