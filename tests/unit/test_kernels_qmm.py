"""CPU checks of the quantized-matmul kernels: wrapper validation, dispatch on CPU, the
references, and the Triton kernels themselves under Triton's interpreter.

The interpreter runs in a subprocess (`TRITON_INTERPRET=1` must be set before any kernel is
decorated, and must not leak into GPU tests in the same pytest process). Two interpreter
defects of Triton 3.6 with numpy >= 2.3 are patched there, not in orbit: `int()` of a
one-element array (loop bounds) and bf16 `tl.dot` multiplying the raw uint16 bits. Its
fp32->e4m3 cast also mis-rounds values that carry into the next binade, so activation
quantization is checked bit for bit only on the GPU (tests/gpu).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

from orbit.kernels.dispatch import qmm, qmm_reference, qmm_t, qmm_t_reference
from orbit.kernels.random_weights import random_qweight
from orbit.quant.qweight import E2M1_VALUES, QuantizedWeight

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
CASES = [("int4", {"group_size": 32}, 320), ("int4", {"group_size": 64, "asym": True}, 320),
         ("int4", {"group_size": 128}, 384), ("int8", {"group_size": 32}, 320),
         ("fp8", {}, 320), ("nvfp4", {}, 320), ("mxfp4", {}, 320), ("bf16", {}, 320)]


def _interpreter_main() -> None:
    """Runs in the subprocess: every format, forward and input gradient, fast and exact."""
    patch_interpreter(bf16_dot=True)
    from orbit.kernels import _qgemm, fp4, fp8, int4, int8

    fns = {"int4": int4.int4_matmul, "int8": int8.int8_matmul, "fp8": fp8.fp8_matmul,
           "nvfp4": fp4.nvfp4_matmul, "mxfp4": fp4.mxfp4_matmul, "bf16": _qgemm.bf16_matmul}
    out = {}
    for i, (fmt, kw, k) in enumerate(CASES):
        n, m = 192, 5
        qw = random_qweight(fmt, n, k, seed=i, **kw)
        w = qw.dequantize(torch.bfloat16).double()
        x, dy = torch.randn(m, k).bfloat16(), torch.randn(m, n).bfloat16()
        for exact in (False, True):  # exact: same code, other tiles (each format's loader
            # must accept them: MXFP4 needs a 32-wide group along `in` in the input gradient)
            y = fns[fmt](x, qw, exact=exact, out=torch.full((m, n), float("nan")).bfloat16())
            dx = fns[fmt](dy, qw, transpose=True, exact=exact,
                          out=torch.full((m, k), float("nan")).bfloat16())
            ey = ((y.double() - x.double() @ w.T).norm() / (x.double() @ w.T).norm()).item()
            edx = ((dx.double() - dy.double() @ w).norm() / (dy.double() @ w).norm()).item()
            out[f"{i}-{exact}"] = [ey, edx]
    # Swap-AB forward (TileConfig.swap, a decode experiment): every format through the
    # public wrappers with pick_config replaced, M = 5 (no GEMV) and M = 17 (two row tiles).
    orig_pick = _qgemm.pick_config
    _qgemm.pick_config = lambda *a, **kw: _qgemm.TileConfig(bm=16, bo=32, br=64, warps=4,
                                                             stages=2, swap=True)
    try:
        for i, (fmt, kw, k) in enumerate(CASES):
            qw = random_qweight(fmt, 72, k, seed=50 + i, **kw)  # out 72: a masked tail
            w = qw.dequantize(torch.bfloat16).double()
            errs = []
            for m in (5, 17):
                x = torch.randn(m, k).bfloat16()
                y = fns[fmt](x, qw, out=torch.full((m, 72), float("nan")).bfloat16())
                ref = x.double() @ w.T
                errs.append(((y.double() - ref).norm() / ref.norm()).item())
            out[f"swap-{i}"] = errs
    finally:
        _qgemm.pick_config = orig_pick
    # INT4 K steps over nibble-plane pairs (TileConfig.unpack = 3, orbit/kernels/plane_dot.py):
    # sym / asym, bf16 / fp32 scales, a K tail (320 with 128-deep steps), an out tail (72),
    # 1 / 5 / 17 rows, split-K 1 and 2, swapped or not; against x @ W^T and the join-tree
    # loop's output.
    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS

    cfgs = [_qgemm.TileConfig(bm=16, bo=32, br=64, warps=4, stages=2, unpack=UNPACK_PLANE_PAIRS),
            _qgemm.TileConfig(bm=16, bo=64, br=128, warps=4, stages=2, split=2,
                              unpack=UNPACK_PLANE_PAIRS),
            # swapped (register-fed on the GPU), unsplit and split: y^T tiles, transposed
            # partials and fix-up
            _qgemm.TileConfig(bm=16, bo=32, br=64, warps=4, stages=1, swap=True,
                              unpack=UNPACK_PLANE_PAIRS),
            _qgemm.TileConfig(bm=16, bo=64, br=128, warps=4, stages=1, swap=True, split=2,
                              unpack=UNPACK_PLANE_PAIRS)]
    pair_cases = [({"group_size": 32}, 320), ({"group_size": 64, "asym": True}, 320),
                  ({"group_size": 128, "scale_dtype": torch.float32}, 384)]
    for i, (kw, k) in enumerate(pair_cases):
        qw = random_qweight("int4", 72, k, seed=70 + i, **kw)
        t = qw.tensors
        w = qw.dequantize(torch.bfloat16).double()
        errs = []
        for m in (1, 5, 17):
            x = torch.randn(m, k).bfloat16()
            ref = x.double() @ w.T
            base = _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], t.get("offset"),
                                 None, qw.group_size, False, False, None,
                                 _qgemm.TileConfig(bm=16, bo=32, br=64, warps=4, stages=2))
            for cfg in cfgs:
                y = _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], t.get("offset"),
                                  None, qw.group_size, False, False,
                                  torch.full((m, 72), float("nan")).bfloat16(), cfg)
                errs.append(((y.double() - ref).norm() / ref.norm()).item())
                errs.append(((y.double() - base.double()).norm() / ref.norm()).item())
        out[f"pairs-{i}"] = errs
    # NVFP4 over the same pairs (bytes viewed as int32 words, global scale in the epilogue):
    # out tail 72, K 320 (a tail at 128-deep steps), 1 / 5 / 17 rows, split-K; and one-hot rows,
    # which read single weights back: the reference's fp32 weights, cast once.
    qw = random_qweight("nvfp4", 72, 320, seed=80)
    t = qw.tensors
    w = qw.dequantize(torch.bfloat16)
    errs = []
    for m in (1, 5, 17):
        x = torch.randn(m, 320).bfloat16()
        ref = x.double() @ w.double().T
        for cfg in cfgs:
            y = _qgemm.launch(x, "nvfp4", qw.shape, t["qweight"], t["scale"], None,
                              t["global_scale"].reshape(1), 16, False, False,
                              torch.full((m, 72), float("nan")).bfloat16(), cfg)
            errs.append(((y.double() - ref).norm() / ref.norm()).item())
    out["pairs-nvfp4"] = errs
    # MXFP4 over the same pairs (plain decode; E8M0 scales per 32 columns)
    mq = random_qweight("mxfp4", 72, 320, seed=82)
    mw = mq.dequantize(torch.bfloat16).double()
    errs = []
    for m in (1, 5, 17):
        x = torch.randn(m, 320).bfloat16()
        ref = x.double() @ mw.T
        for cfg in cfgs:
            y = _qgemm.launch(x, "mxfp4", mq.shape, mq.tensors["qweight"], mq.tensors["scale"],
                              None, None, 32, False, False,
                              torch.full((m, 72), float("nan")).bfloat16(), cfg)
            errs.append(((y.double() - ref).norm() / ref.norm()).item())
    out["pairs-mxfp4"] = errs
    cols = torch.arange(16) * 20 + torch.arange(16) % 8
    onehot = torch.zeros(16, 320).bfloat16()
    onehot[torch.arange(16), cols] = 1.0
    # (the interpreter truncates fp32 -> bf16 casts: compare with the fp32 weights truncated)
    w32 = qw.dequantize(torch.float32)[:, cols].T.contiguous()
    trunc = (w32.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    # a route table's pairs tile for a weight whose rows are not 4-byte aligned (a view 2
    # bytes into each row): the launch falls back to the tile's usual unpack, same values
    from orbit.kernels.qmm_routes import ROUTES, Route, RouteTable

    big = random_qweight("nvfp4", 72, 352, seed=81)
    view = QuantizedWeight("nvfp4", (72, 320), {
        "qweight": big.tensors["qweight"][:, 2:162], "scale": big.tensors["scale"][:, :20],
        "global_scale": big.tensors["global_scale"]}, 16)
    table = RouteTable(device="cpu")
    table.add("nvfp4", 72, 320, 64, Route("dot", cfgs[3]))
    x = torch.randn(5, 320).bfloat16()
    with ROUTES.scoped(table):
        y = fp4.nvfp4_matmul(x, view, out=torch.full((5, 72), float("nan")).bfloat16())
    ref = x.double() @ view.dequantize(torch.bfloat16).double().T
    out["pairs-nvfp4-unaligned"] = ((y.double() - ref).norm() / ref.norm()).item()
    out["pairs-nvfp4-onehot"] = all(
        torch.equal(_qgemm.launch(onehot, "nvfp4", qw.shape, t["qweight"], t["scale"], None,
                                  t["global_scale"].reshape(1), 16, False, False, None, c), trunc)
        for c in (cfgs[0], cfgs[3]))
    # W8A8 GEMM on the reference's quantized activations (see the module docstring).
    qw = random_qweight("fp8", 192, 320, seed=9)
    x = torch.randn(5, 320).bfloat16()
    xq, sx = fp8.act_quant_fp8_reference(x)
    y = fp8.w8a8_gemm(xq, sx, qw, torch.bfloat16)
    ref = fp8.w8a8_matmul_reference(x, qw).double()
    out["w8a8"] = ((y.double() - ref).norm() / ref.norm()).item()
    # E2M1: every code through the nvfp4 loader (scale 1, global scale 1) against the table.
    codes = torch.arange(16, dtype=torch.uint8)
    q = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 8).repeat(16, 1)  # [16, 8]: 16 codes/row
    one = torch.ones(16, 1).to(torch.float8_e4m3fn)
    qw = QuantizedWeight("nvfp4", (16, 16), {"qweight": q, "scale": one,
                                             "global_scale": torch.tensor(1.0)}, 16)
    eye = torch.eye(16).bfloat16()
    out["e2m1"] = fp4.nvfp4_matmul(eye, qw, transpose=True)[0].float().tolist()
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("key", [f"{i}-{e}" for i in range(len(CASES)) for e in (False, True)])
def test_interpreted_kernels_match_reference(interp_results: dict, key: str) -> None:
    # The interpreter truncates fp32->bf16 casts, so allow 1e-2 (the GPU test is the tight one).
    ey, edx = interp_results[key]
    assert ey < 1e-2 and edx < 1e-2, (CASES[int(key.split("-")[0])], ey, edx)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_interpreted_swap_ab_forward(interp_results: dict, case: int) -> None:
    assert max(interp_results[f"swap-{case}"]) < 1e-2, (CASES[case], interp_results[f"swap-{case}"])


@pytest.mark.parametrize("case", range(3))
def test_interpreted_plane_pair_steps(interp_results: dict, case: int) -> None:
    """unpack = 3 (nibble-plane pairs) against float64 x @ W^T and against the join-tree loop
    (same weights, other summation order), every output written (NaN-poisoned)."""
    errs = interp_results[f"pairs-{case}"]
    assert not any(math.isnan(e) for e in errs), errs  # every element written
    assert max(errs) < 1e-2, errs


def test_interpreted_nvfp4_plane_pair_steps(interp_results: dict) -> None:
    """NVFP4 over nibble-plane pairs (plain decode, the interpreter's): against float64, every
    output written, and one-hot rows give the dequantized fp32 weights cast once (the GPU test
    checks the CUDA inline-asm decode the same way)."""
    errs = interp_results["pairs-nvfp4"]
    assert not any(math.isnan(e) for e in errs) and max(errs) < 1e-2, errs
    assert interp_results["pairs-nvfp4-onehot"]
    assert interp_results["pairs-nvfp4-unaligned"] < 1e-2  # (NaN fails too)


def test_interpreted_mxfp4_plane_pair_steps(interp_results: dict) -> None:
    errs = interp_results["pairs-mxfp4"]
    assert not any(math.isnan(e) for e in errs) and max(errs) < 1e-2, errs


def test_plane_pairs_are_4bit_forward_fast_only() -> None:
    from orbit.kernels import _qgemm
    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS

    cfg = _qgemm.TileConfig(bm=16, bo=32, br=64, warps=4, stages=2, unpack=UNPACK_PLANE_PAIRS)
    qw = random_qweight("int4", 64, 128, group_size=32)
    t = qw.tensors
    for transpose, exact, c in ((True, False, cfg), (False, True, cfg),
                                (False, False, _qgemm.TileConfig(
                                    bm=16, bo=32, br=32, warps=4, stages=2,
                                    unpack=UNPACK_PLANE_PAIRS))):
        x = torch.randn(3, 64 if transpose else 128).bfloat16()
        with pytest.raises(ValueError, match="plane pairs"):
            _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32,
                          transpose, exact, None, c)
    fq = random_qweight("fp8", 128, 128)
    with pytest.raises(ValueError, match="plane pairs"):
        _qgemm.launch(torch.randn(3, 128).bfloat16(), "fp8", fq.shape, fq.tensors["weight"],
                      fq.tensors["scale_inv"], None, None, 128, False, False, None, cfg)
    nq = random_qweight("nvfp4", 64, 144)  # rows of 72 bytes, then a view starting 2 bytes in
    q = nq.tensors["qweight"][:, 2:66]
    with pytest.raises(ValueError, match="4-byte aligned"):
        _qgemm.launch(torch.randn(3, 128).bfloat16(), "nvfp4", (64, 128), q,
                      nq.tensors["scale"][:, :8], None, nq.tensors["global_scale"], 16, False,
                      False, None, cfg)


def test_swap_ab_is_forward_fast_only() -> None:
    from orbit.kernels import _qgemm

    qw = random_qweight("int4", 64, 128, group_size=32)
    t = qw.tensors
    cfg = _qgemm.TileConfig(bm=16, bo=32, br=64, warps=4, stages=2, swap=True)
    for transpose, exact in ((True, False), (False, True)):
        x = torch.randn(3, 64 if transpose else 128).bfloat16()
        with pytest.raises(ValueError, match="swap"):
            _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32,
                          transpose, exact, None, cfg)


def test_interpreted_w8a8_gemm(interp_results: dict) -> None:
    assert interp_results["w8a8"] < 1e-2


def test_e2m1_decode_equals_table(interp_results: dict) -> None:
    assert interp_results["e2m1"] == [float(v) for v in E2M1_VALUES]


def test_wrappers_reject_bad_layouts() -> None:
    from orbit.kernels.fp4 import nvfp4_matmul
    from orbit.kernels.fp8 import fp8_matmul
    from orbit.kernels.int4 import int4_matmul

    qw = random_qweight("int4", 64, 128, group_size=32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        int4_matmul(torch.randn(2, 128), qw)
    with pytest.raises(ValueError, match="features"):
        int4_matmul(torch.randn(2, 64).bfloat16(), qw)
    with pytest.raises(ValueError, match="contiguous"):
        int4_matmul(torch.randn(128, 2).bfloat16().T, qw)
    with pytest.raises(ValueError, match=r"tensor 'scale' is .* expected .* shape \(64, 8\)"):
        int4_matmul(torch.randn(2, 128).bfloat16(),  # group 16 needs 8 scales per row
                    QuantizedWeight("int4", (64, 128), qw.tensors, 16))
    bad = dict(qw.tensors, qweight=qw.tensors["qweight"].to(torch.int64))
    with pytest.raises(ValueError, match="qweight"):
        int4_matmul(torch.randn(2, 128).bfloat16(), QuantizedWeight("int4", (64, 128), bad, 32))
    with pytest.raises(ValueError, match="int4_matmul got"):
        int4_matmul(torch.randn(2, 128).bfloat16(), random_qweight("fp8", 64, 128))
    fq = random_qweight("fp8", 64, 128)
    with pytest.raises(ValueError, match="scale_inv"):
        fp8_matmul(torch.randn(2, 128).bfloat16(), QuantizedWeight(
            "fp8", (64, 128), dict(fq.tensors, scale_inv=torch.ones(2, 2)), 128))
    with pytest.raises(ValueError, match="out must be"):
        fp8_matmul(torch.randn(2, 128).bfloat16(), fq, out=torch.empty(2, 63).bfloat16())
    nq = random_qweight("nvfp4", 64, 128)
    with pytest.raises(ValueError, match="global_scale"):
        nvfp4_matmul(torch.randn(2, 128).bfloat16(), QuantizedWeight(
            "nvfp4", (64, 128), dict(nq.tensors, global_scale=torch.ones(2)), 16))


@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4", "mxfp4", "bf16"])
def test_dispatch_on_cpu_is_the_reference(fmt: str) -> None:
    qw = random_qweight(fmt, 48, 128, group_size=32)
    x, dy = torch.randn(3, 128).bfloat16(), torch.randn(3, 48).bfloat16()
    assert torch.equal(qmm(x, qw), qmm_reference(x, qw))
    assert torch.equal(qmm_t(dy, qw), qmm_t_reference(dy, qw))
    assert torch.equal(qmm(x, qw, exact=True), qmm_reference(x, qw))


def test_w8a8_reference_on_cpu() -> None:
    from orbit.kernels.fp8 import act_quant_fp8_reference

    qw = random_qweight("fp8", 64, 300)
    x = torch.randn(4, 300).bfloat16()
    x[1, 128:256] = 0
    xq, sx = act_quant_fp8_reference(x)
    assert xq.shape == (4, 300) and sx.shape == (4, 3) and (sx > 0).all()
    back = xq.float() * sx.repeat_interleave(128, 1)[:, :300]
    assert ((back - x.float()).norm() / x.float().norm()) < 0.05  # e4m3: 3 mantissa bits
    assert (back[1, 128:256] == 0).all()
    y = qmm(x, qw, act_quant="fp8")
    ref = x.double() @ qw.dequantize().double().T
    assert ((y.double() - ref).norm() / ref.norm()) < 0.08
    with pytest.raises(ValueError, match="act_quant"):
        qmm(x, qw, act_quant="int8")
    with pytest.raises(ValueError, match="fp8 weight"):
        qmm(x[:, :288], random_qweight("int4", 64, 288, group_size=32), act_quant="fp8")

if __name__ == "__main__":
    _interpreter_main()
