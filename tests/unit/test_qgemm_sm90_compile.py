"""The real fused-matmul kernel (`_qgemm._qgemm_kernel`) compiles for sm_90 on a machine
without a GPU (Triton + its bundled ptxas), for every format's usual tile, exact mode, the
swapped loop, split-K and the nibble-plane pairs. The CPU interpreter runs jit code as Python
and so accepts what the GPU compiler refuses (a non-constexpr global read inside a kernel, for
one: session 14 found `UNPACK_PLANE_PAIRS` read that way, which would have failed every INT4
`tl.dot` launch on the device). Also pins the register-fed property on the real kernel: one
stage, no weight tile in shared memory (orbit/kernels/plane_dot.py, "Register-fed")."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_bench

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="this Triton ships no ptxas")

# pointer arguments and their element types (the others are i32, lscale fp32)
_PTRS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "o_ptr": "*bf16", "g_ptr": "*fp32", "h_ptr": "*bf16",
         "a0": "*bf16", "a1": "*bf16", "a2": "*bf16", "b0": "*bf16", "b1": "*bf16",
         "b2": "*bf16", "hc_ptr": "*i32", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
# format id -> (qweight, scale element types, group)
_FMT = {0: ("*i32", "*bf16", 128), 1: ("*i8", "*bf16", 128), 2: ("*fp8e4nv", "*fp32", 128),
        3: ("*i32", "*fp8e4nv", 16), 4: ("*i32", "*u8", 32), 5: ("*bf16", "*bf16", 0)}


def _compile(fmt: int, bm: int, bo: int, br: int, stages: int, unpack: int, swap: bool = False,
             split: int = 1, trans: bool = False, pasm: bool = False):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from orbit.kernels import _qgemm

    q_ty, s_ty, group = _FMT[fmt]
    if unpack != 3 and fmt in (3, 4):
        q_ty = "*u8"  # the usual fp4 tile loaders read the bytes
    consts = {"FMT": fmt, "GROUP": group, "HAS_OFFSET": False, "TRANS": trans, "BM": bm,
              "BO": bo, "BR": br, "GROUP_M": 8, "UNPACK": unpack, "SWAP": swap, "LORA": 0,
              "LRP": 1, "SHRINK": False, "SBK": 16, "SDOT": False, "SBM": 16, "SPLIT": split,
              "PASM": pasm}
    fn = _qgemm._qgemm_kernel
    sig = {}
    for name in fn.arg_names:
        sig[name] = ("constexpr" if name in consts else {"q_ptr": q_ty, "s_ptr": s_ty}.get(
            name, _PTRS.get(name, "fp32" if name == "lscale" else "i32")))
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": stages})


@pytest.mark.parametrize("fmt", sorted(_FMT))
def test_every_format_compiles_for_sm90(fmt: int) -> None:
    from orbit.kernels import _qgemm

    unpack = _qgemm.DEFAULT_UNPACK.get({0: "int4", 3: "nvfp4", 4: "mxfp4"}.get(fmt, ""), 0)
    c = _qgemm.pick_config(16, 2048, "int4", False)
    _compile(fmt, c.bm, c.bo, c.br, c.stages, unpack)  # fast-mode decode tile
    e = _qgemm.EXACT_DECODE_CONFIG_MX if fmt == 4 else _qgemm.EXACT_DECODE_CONFIG
    _compile(fmt, e.bm, e.bo, e.br, e.stages, unpack, trans=True)  # exact input gradient
    _compile(fmt, 16, 64, 128, 3, unpack, swap=True, split=2)  # swapped, split


@pytest.mark.parametrize(("fmt", "pasm"), [(0, True), (0, False), (3, True), (3, False),
                                           (4, False)])
def test_register_fed_pairs_keep_weights_out_of_shared_memory(fmt: int, pasm: bool) -> None:
    sass = load_bench("sass_qmm")
    for bm, bo, br, swap, split in [(16, 128, 128, True, 4), (16, 64, 256, False, 2),
                                    (64, 64, 128, True, 1)]:
        ttgir = _compile(fmt, bm, bo, br, 1, 3, swap=swap, split=split, pasm=pasm).asm["ttgir"]
        allocs, weights = sass.smem_allocs(ttgir, bm, br)
        assert allocs and not weights, (fmt, bm, bo, br, swap, allocs)
