"""CPU checks of the decode GEMV / split-K kernel (orbit/kernels/gemv.py) under Triton's
interpreter, plus its config heuristic and its routing in `_qgemm.launch`.

The interpreter runs in a subprocess, as in test_kernels_qmm.py (whose docstring lists the
Triton 3.6 interpreter defects): `TRITON_INTERPRET=1` must be set before any kernel is
decorated and must not leak into GPU tests of the same pytest process. Patched there: `int()`
of a one-element array (loop bounds), and the fp32 -> bf16 cast, which the interpreter
truncates; the patch rounds to nearest even like the GPU, so the kernel multiplies exactly the
reference's BF16 weights and the tolerances below are the GPU's (fp32 sums, one bf16 rounding
of the output), not the 1e-2 that truncation needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from sm90_ptx import sm90_ptx
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
# (fmt, random_qweight kwargs, in); out = 80 is not a multiple of any block_n (masked tail);
# in = 320 is not a multiple of block_k = 128 (masked tail, fp8 partial scale block).
CASES = [("int4", {"group_size": 32}, 320), ("int4", {"group_size": 128}, 384),
         ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 320),
         ("int8", {"group_size": 32}, 320), ("fp8", {}, 320), ("nvfp4", {}, 320),
         ("mxfp4", {}, 320)]
N_OUT = 80
MS = (1, 3, 16)
# "auto" = through the format's public wrapper (launch -> heuristic); the others call gemv()
# with a fixed config: (block_n, block_k, split, warps, stages, unpack, planes, e2m1,
# fixup, defer, x_prefetch); split-K adds the slices in the last-arriving program unless fixup is False. 4-bit formats
# run the nibble-plane kernel unless planes is False ("tiles": the dequantized-tile kernel).
CONFIGS = {"nosplit": (32, 128, 1, 4, 3), "split3": (16, 64, 3, 4, 2),
           "split3-reduce-launch": (16, 64, 3, 4, 2, -1, True, False, False),
           "tiles": (32, 128, 2, 4, 3, -1, False), "planes256": (32, 256, 1, 4, 3),
           "planes-e2m1bits": (32, 128, 2, 4, 3, -1, True, 1),
           "planes-e2m1fold": (32, 128, 2, 4, 3, -1, True, 2),
           "planes-nodefer": (32, 256, 2, 4, 3, -1, True, False, True, False),
           "planes-xprefetch": (16, 128, 3, 4, 3, -1, True, False, True, True, True),
           # w_preload (the last field): the first step's operands loaded before the PDL wait
           "planes-wpre": (16, 128, 3, 4, 3, -1, True, False, True, True, True, False, False,
                           1),
           "planes-wpre-nodefer": (32, 128, 2, 4, 3, -1, True, False, True, False, False,
                                   False, False, 1),
           "planes-wpre2": (16, 128, 2, 4, 3, -1, True, False, True, True, True, False, False,
                            2),
           "auto": None}
# vs x (float64) @ W_bf16^T: bf16 output rounding, ~1e-3 relative; the plane kernel multiplies
# the unrounded weights (the bf16 rounding of W adds ~1e-3 more).
TOL_F64 = 4e-3
TOL_QMM_REF = 6e-3  # vs qmm_reference (a bf16 matmul: its own rounding as well)


def _interpreter_main() -> None:
    """Runs in the subprocess; prints one JSON dict of relative errors and flags."""
    patch_interpreter(bf16_round=True)
    from orbit.kernels import _qgemm, fp4, fp8, gemv, int4, int8
    from orbit.kernels.dispatch import qmm_reference
    from orbit.kernels.random_weights import random_qweight

    fns = {"int4": int4.int4_matmul, "int8": int8.int8_matmul, "fp8": fp8.fp8_matmul,
           "nvfp4": fp4.nvfp4_matmul, "mxfp4": fp4.mxfp4_matmul}
    calls = []
    orig_gemv = gemv.gemv

    def counting_gemv(*a, **kw):
        calls.append(a[0].shape[0])
        return orig_gemv(*a, **kw)

    gemv.gemv = counting_gemv  # launch() imports gemv from the module at each call
    # These shapes are too small for the shipped routing rule (deep split-K only); route every
    # M <= 16 so the kernel is checked through the public wrappers too.
    _qgemm.GEMV_MAX_M, _qgemm.GEMV_MIN_SPLIT, _qgemm.GEMV_MIN_SPLIT_INT4_M1 = 16, 1, 1
    out: dict = {}
    for i, (fmt, kw, k) in enumerate(CASES):
        qw = random_qweight(fmt, N_OUT, k, seed=100 + i, **kw)
        t = qw.tensors
        q, s = t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv"))
        gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
        group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(fmt, qw.group_size)
        w = qw.dequantize(torch.bfloat16).double()
        for m in MS:
            for name, c in CONFIGS.items():
                if name.startswith("planes") and fmt not in gemv.PLANE_FORMATS:
                    continue  # a 256-deep step is for the plane kernel (fp8 tiles stop at 128)
                x = torch.randn(m, k).bfloat16()  # fresh for every call
                y = torch.full((m, N_OUT), float("nan")).bfloat16()  # poisoned
                if c is None:
                    n_calls = len(calls)
                    y = fns[fmt](x, qw, out=y)
                    routed = len(calls) == n_calls + 1
                else:
                    gemv.gemv(x, fmt, qw.shape, q, s, t.get("offset"), gs, group, y,
                              gemv.GemvConfig(*c))
                    routed = True
                ref64 = x.double() @ w.T
                ref = qmm_reference(x, qw).double()
                out[f"{i}-{m}-{name}"] = {
                    "nan": bool(y.isnan().any()), "routed": routed,
                    "e64": ((y.double() - ref64).norm() / ref64.norm()).item(),
                    "eref": ((y.double() - ref).norm() / ref.norm()).item()}
    # Split-K is deterministic: the same call twice gives the same bits.
    qw = random_qweight("int4", N_OUT, 384, group_size=128, seed=7)
    t = qw.tensors
    x = torch.randn(5, 384).bfloat16()
    ys = [gemv.gemv(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 128,
                    torch.empty(5, N_OUT).bfloat16(), gemv.GemvConfig(16, 32, 4, 4, 2))
          for _ in range(2)]
    out["deterministic"] = torch.equal(ys[0], ys[1])
    # The in-kernel fix-up adds the slices in the order the second launch does: same bits; and
    # it leaves its arrival counters at 0 for the next launch.
    for planes in (True, False):
        two = gemv.gemv(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 128,
                        torch.empty(5, N_OUT).bfloat16(),
                        gemv.GemvConfig(16, 32, 4, 4, 2, -1, planes, False, False))
        one = gemv.gemv(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 128,
                        torch.empty(5, N_OUT).bfloat16(),
                        gemv.GemvConfig(16, 32, 4, 4, 2, -1, planes, False, True))
        out[f"fixup-same-bits-{planes}"] = torch.equal(one, two)
    cnt = torch.zeros(8, dtype=torch.int32)
    orig_counters = gemv.arrival_counters
    gemv.arrival_counters = lambda device, tiles: cnt
    gemv.gemv(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 128,
              torch.empty(5, N_OUT).bfloat16(), gemv.GemvConfig(16, 32, 4, 4, 2))
    gemv.arrival_counters = orig_counters
    out["counters-rearmed"] = cnt.tolist()
    # E2M1: every code through the three plane decodes (fp16 bits + convert; fp32 bits +
    # select; fp32 bits of value * 2^-126), scale 1 and global scale 1; one-hot x rows read the
    # codes back: y[m, n] = W[n, m].
    codes = torch.arange(16, dtype=torch.uint8)
    q = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 8).repeat(16, 1)  # [16 out, 8 bytes]
    one = torch.ones(16, 1).to(torch.float8_e4m3fn)
    for e2m1 in (0, 1, 2):
        y = gemv.gemv(torch.eye(16).bfloat16(), "nvfp4", (16, 16), q, one, None,
                      torch.ones(1), 16, torch.empty(16, 16).bfloat16(),
                      gemv.GemvConfig(16, 16, 1, 4, 1, e2m1=e2m1))
        out[f"e2m1-{e2m1}"] = y[:, 0].float().tolist()
    # e2m1 = 2 moves the products and sums by exact powers of two (2^-62 and 2^-48 against the
    # fp16 decode's): on random weights, x and scales, the fp32 outputs are the same bits,
    # deferred reduction (M = 1) or not, split or not.
    qn = random_qweight("nvfp4", N_OUT, 320, seed=11)
    tn = qn.tensors
    same = []
    for m, split, defer in [(1, 1, True), (1, 3, True), (3, 2, False)]:
        x = torch.randn(m, 320).bfloat16()
        ys = [gemv.gemv(x, "nvfp4", qn.shape, tn["qweight"], tn["scale"], None,
                        tn["global_scale"].reshape(1), 16, torch.empty(m, N_OUT),
                        gemv.GemvConfig(16, 64, split, 4, 2, e2m1=e2m1, defer=defer))
              for e2m1 in (0, 2)]
        same.append(torch.equal(ys[0], ys[1]) and not ys[0].isnan().any().item())
    out["e2m1-fold-same-bits"] = same
    # w_preload peels the first K steps out of the loop: the same sums in the same order, so
    # the same bits as the loop alone (every plane format, deferred or not, split or not; 2
    # preloaded steps where a slice has 1, 2 or 3).
    same = {}
    for i, (fmt, kw, k) in enumerate(CASES):
        if fmt not in gemv.PLANE_FORMATS:
            continue
        qp = random_qweight(fmt, N_OUT, k, seed=300 + i, **kw)
        tp = qp.tensors
        group = {"nvfp4": 16, "mxfp4": 32}.get(fmt, qp.group_size)
        gs = tp["global_scale"].reshape(1) if fmt == "nvfp4" else None
        for m, c in [(1, (16, 128, 3, 4, 3, -1, True, 0, True, True, True)),
                     (3, (32, 128, 1, 4, 3, -1, True, 0, True, False, False))]:
            x = torch.randn(m, k).bfloat16()
            ys = [gemv.gemv(x, fmt, qp.shape, tp.get("qweight", tp.get("weight")), tp["scale"],
                            tp.get("offset"), gs, group, torch.empty(m, N_OUT).bfloat16(),
                            gemv.GemvConfig(*c, False, False, wp)) for wp in (0, 1, 2)]
            same[f"{i}-{m}"] = (torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2])
                                and not ys[0].isnan().any().item())
    out["wpre-same-bits"] = same
    # Routing: exact mode, the input gradient, M > GEMV_MAX_M and GEMV_MAX_M = 0 stay on the
    # tl.dot kernel (the interpreter needs its bf16-dot patch there, so only count calls).
    n_calls = len(calls)
    orig_launch_kernel = _qgemm._qgemm_kernel
    fused = []

    class _Stub:  # stands in for the fused kernel: records the launch, computes nothing
        def __getitem__(self, grid):
            return lambda *a, **kw: fused.append(grid)

    _qgemm._qgemm_kernel = _Stub()
    x1 = torch.randn(1, 384).bfloat16()
    int4.int4_matmul(x1, qw, exact=True)
    int4.int4_matmul(torch.randn(1, N_OUT).bfloat16(), qw, transpose=True)
    int4.int4_matmul(torch.randn(17, 384).bfloat16(), qw)
    _qgemm.GEMV_MAX_M = 0
    int4.int4_matmul(x1, qw)
    _qgemm._qgemm_kernel = orig_launch_kernel
    out["not_routed"] = [len(calls) - n_calls, len(fused)]
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=[
    f"{f}-{'-'.join(f'{k}{v}' for k, v in kw.items() if k != 'offset_dtype')}"
    for f, kw, _ in CASES])
def test_interpreted_gemv_matches_reference(interp_results: dict, case: int, m: int,
                                            config: str) -> None:
    if config.startswith("planes") and CASES[case][0] not in ("int4", "nvfp4", "mxfp4"):
        pytest.skip("plane-kernel config; this format runs the tile kernel")
    r = interp_results[f"{case}-{m}-{config}"]
    assert not r["nan"], "unwritten (NaN) outputs"
    assert r["routed"], "fast-mode forward with M <= 16 did not go through gemv"
    assert r["e64"] < TOL_F64 and r["eref"] < TOL_QMM_REF, (CASES[case], m, config, r)


@pytest.mark.parametrize("e2m1", [0, 1, 2])
def test_plane_e2m1_decode_equals_table(interp_results: dict, e2m1: int) -> None:
    from orbit.quant.qweight import E2M1_VALUES

    assert interp_results[f"e2m1-{e2m1}"] == list(E2M1_VALUES)


def test_plane_e2m1_folded_scale_same_bits(interp_results: dict) -> None:
    assert interp_results["e2m1-fold-same-bits"] == [True, True, True]


def test_first_step_preload_same_bits(interp_results: dict) -> None:
    same = interp_results["wpre-same-bits"]
    assert len(same) == 10 and all(same.values()), same  # 5 plane cases x 2


def test_split_k_is_deterministic(interp_results: dict) -> None:
    assert interp_results["deterministic"]


@pytest.mark.parametrize("planes", [True, False])
def test_split_k_fixup_matches_reduce_launch(interp_results: dict, planes: bool) -> None:
    assert interp_results[f"fixup-same-bits-{planes}"]


def test_split_k_fixup_rearms_counters(interp_results: dict) -> None:
    assert interp_results["counters-rearmed"] == [0] * 8


def test_exact_transpose_and_large_m_bypass_gemv(interp_results: dict) -> None:
    # 0 gemv calls; 4 fused launches (exact, transpose, M=17, GEMV_MAX_M=0).
    assert interp_results["not_routed"] == [0, 4]


def test_pick_gemv_config() -> None:
    from orbit.kernels.gemv import GEMV_MAX_SPLIT, pick_gemv_config

    for (k, n) in [(576, 576), (576, 1536), (1536, 576), (576, 192), (2048, 6144),
                   (6144, 2048), (2048, 4096), (4096, 12288)]:
        for m in (1, 2, 3, 4, 8, 16):
            for fmt in ("int4", "int8", "fp8", "nvfp4", "mxfp4"):
                c = pick_gemv_config(m, n, k, fmt, 132)
                assert c.planes == (fmt in ("int4", "nvfp4", "mxfp4")), (fmt, c)
                assert c.planes or c.block_k <= 128, ("fp8 tiles stop at one scale block", c)
                assert 1 <= c.split <= GEMV_MAX_SPLIT, (k, n, m, c)
                k_tiles = -(-k // c.block_k)
                per = -(-k_tiles // c.split)
                assert -(-k_tiles // per) == c.split, ("empty K-slice", k, n, c)
                one = m == 1 and c.planes
                assert c.defer == one and c.x_prefetch == one, ("M = 1 plane options", m, c)
    # A big N fills the SMs without split-K; small N splits K (INT4 at M = 1: narrower
    # unsplit tiles instead, PLANES_M1_UNSPLIT).
    assert pick_gemv_config(1, 12288, 4096, "int4", 132).split == 1
    assert pick_gemv_config(1, 12288, 4096, "int4", 132).block_n == 32
    for fmt in ("nvfp4", "mxfp4", "fp8"):
        assert pick_gemv_config(1, 2048, 6144, fmt, 132).split > 1, fmt
    assert pick_gemv_config(4, 2048, 6144, "int4", 132).split > 1
    assert pick_gemv_config(4, 1536, 576, "int4", 132).split > 1
    for n, k in ((2048, 6144), (1536, 576), (2048, 2048)):
        c = pick_gemv_config(1, n, k, "int4", 132)
        assert (c.split, c.block_n) == (1, 16), (n, k, c)


def test_int4_m1_unsplit_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.PLANES_M1_UNSPLIT off (bench_engine --plane-tiles split) gives back the split rule
    for INT4 at M = 1 and changes nothing at other M or formats."""
    from orbit.kernels import gemv

    shapes = ((2048, 6144), (2048, 2048), (4096, 2048), (12288, 2048), (1536, 576))
    on = {(m, n, k, f): gemv.pick_gemv_config(m, n, k, f, 132) for m in (1, 4)
          for n, k in shapes for f in ("int4", "nvfp4", "fp8")}
    monkeypatch.setattr(gemv, "PLANES_M1_UNSPLIT", False)
    for (m, n, k, f), c in on.items():
        off = gemv.pick_gemv_config(m, n, k, f, 132)
        if m == 1 and f == "int4" and n < 2 * 132 * 32:
            assert off.split > 1 and off.block_n == 32 and c.split == 1, (n, k, off)
        else:
            assert off == c, (m, n, k, f)


def test_int4_m1_unsplit_depth_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.PLANES_BLOCK_K_M1_UNSPLIT: None keeps the general depth rule; 1024 deepens the
    unsplit INT4 M = 1 steps where K holds two of them, and nothing else."""
    from orbit.kernels import gemv

    shapes = ((2048, 6144), (2048, 2048), (12288, 2048), (1536, 576))
    base = {(m, n, k, f): gemv.pick_gemv_config(m, n, k, f, 132) for m in (1, 4)
            for n, k in shapes for f in ("int4", "nvfp4")}
    assert base[(1, 2048, 2048, "int4")].block_k == 512
    monkeypatch.setattr(gemv, "PLANES_BLOCK_K_M1_UNSPLIT", 1024)
    for (m, n, k, f), c in base.items():
        deep = gemv.pick_gemv_config(m, n, k, f, 132)
        if m == 1 and f == "int4" and k >= 2048:
            assert deep == dataclasses.replace(c, block_k=1024), (n, k, deep)
        else:
            assert deep == c, (m, n, k, f)


def test_nvfp4_fp32_decode_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv.NVFP4_FP32_DECODE (bench_engine --nibble-decodes): on by default (measured faster,
    same bits), NVFP4 configs take the fp32-bit E2M1 decode at every M; off gives the fp16
    decode; nothing else changes and no other format is touched."""
    from orbit.kernels import gemv

    assert gemv.NVFP4_FP32_DECODE is True
    for m in (1, 4):
        for fmt in ("int4", "nvfp4", "mxfp4", "fp8"):
            on = gemv.pick_gemv_config(m, 6144, 2048, fmt, 132)
            monkeypatch.setattr(gemv, "NVFP4_FP32_DECODE", False)
            off = gemv.pick_gemv_config(m, 6144, 2048, fmt, 132)
            monkeypatch.setattr(gemv, "NVFP4_FP32_DECODE", True)
            assert off.e2m1 == 0
            assert on.e2m1 == (2 if fmt == "nvfp4" else 0), (m, fmt)
            assert dataclasses.replace(on, e2m1=0) == off


if __name__ == "__main__":
    _interpreter_main()


def test_use_gemv_follows_the_h100_sweep() -> None:
    """The routing rule picks the GEMV exactly where the H100 sweep measured it faster."""
    from orbit.kernels._qgemm import use_gemv

    cpu = torch.device("cpu")  # DEFAULT_NUM_SMS = 132, the H100's
    assert use_gemv(1, 2048, 6144, "int4", cpu) and use_gemv(4, 2048, 6144, "nvfp4", cpu)
    assert use_gemv(1, 4096, 2048, "int4", cpu)  # split 4: int4 at M=1 only
    assert not use_gemv(2, 4096, 2048, "nvfp4", cpu) and not use_gemv(2, 4096, 2048, "int4", cpu)
    # the plane kernel (4-bit) and the FP8 kernel (session 8) win at M = 1 on every shape
    for fmt in ("int4", "nvfp4", "mxfp4", "fp8"):
        assert use_gemv(1, 12288, 4096, fmt, cpu) and not use_gemv(4, 12288, 4096, fmt, cpu)
    assert not use_gemv(1, 12288, 4096, "int8", cpu)  # wide: the dot loop fills the SMs
    for fmt in ("int4", "fp8", "nvfp4"):
        assert not use_gemv(16, 2048, 6144, fmt, cpu)  # M=16: the dot loop wins
        assert not use_gemv(1, 2048, 6144, "bf16", cpu)



@pytest.mark.parametrize("kernel", ["planes", "fp8"])
@pytest.mark.parametrize("wpre,pdl", [(0, 1), (1, 1), (2, 2)])
def test_first_step_preload_comes_before_the_pdl_wait(kernel: str, wpre: int, pdl: int) -> None:
    """sm_90 PTX of the plane and FP8 GEMVs with PDL (offline compile, Triton's own ptxas):
    with w_preload the first steps' weights are loaded before `griddepcontrol.wait` (they do
    not depend on the previous kernel), without it nothing global is; PDL = 2
    (pdl.EARLY_RELEASE) releases the next kernel before the wait, PDL = 1 after it."""
    from orbit.kernels._qgemm import FMT_IDS
    from orbit.kernels.gemv import _gemv_planes_kernel
    from orbit.kernels.gemv_fp8 import _gemv_fp8_kernel

    types = {"x_ptr": "*bf16", "out_ptr": "*fp32", "q_ptr": "*i32", "s_ptr": "*bf16",
             "o_ptr": "*bf16", "g_ptr": "*fp32", "y_ptr": "*bf16", "cnt_ptr": "*i32",
             "lscale": "fp32", "eps": "fp32"}
    if kernel == "planes":
        fn = _gemv_planes_kernel
        consts = {"FMT": FMT_IDS["int4"], "CODE": 0, "GROUP": 128, "HAS_OFFSET": False,
                  "MP": 1, "BN": 32, "NG": 4, "STAGES": 3, "FIXUP": True, "DEFER": True,
                  "ASM": True, "XPRE": True, "PDL": pdl, "WPRE": wpre}
    else:
        fn = _gemv_fp8_kernel
        consts = {"MP": 1, "BN": 32, "BK": 128, "STAGES": 3, "FIXUP": True, "DEC": 1,
                  "XPRE": True, "PDL": pdl, "WPRE": wpre}
        types["s_ptr"] = "*fp32"
    ptx = sm90_ptx(fn, consts, types)
    before = ptx[:ptx.index("griddepcontrol.wait")]
    assert ("ld.global" in before) == (wpre > 0)
    assert ("griddepcontrol.launch_dependents" in before) == (pdl == 2)
    assert "griddepcontrol.launch_dependents" in ptx
