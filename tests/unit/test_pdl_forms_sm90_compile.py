"""sm_90 PTX (offline compile, Triton's own ptxas) of the norm-prologue GEMV and the split-KV
decode attention with its unrolled chunk combine (session 19), so that a codegen error shows
on CPU before a GPU run: both load nothing global before `griddepcontrol.wait` (their
inputs come from the launch before them)."""

from __future__ import annotations

import pytest
from sm90_ptx import sm90_ptx

triton = pytest.importorskip("triton")


@pytest.mark.parametrize("pair", [False, True])
def test_plane_gemv_with_norm_prologue_compiles(pair: bool) -> None:
    from orbit.kernels._qgemm import FMT_IDS
    from orbit.kernels.gemv import _gemv_planes_kernel

    types = {"out_ptr": "*fp32", "q_ptr": "*i32", "g_ptr": "*fp32", "cnt_ptr": "*i32",
             "ncnt_ptr": "*i32", "lscale": "fp32", "eps": "fp32"}
    consts = {"FMT": FMT_IDS["int4"], "CODE": 0, "GROUP": 128, "HAS_OFFSET": False, "MP": 1,
              "BN": 16, "NG": 4, "STAGES": 3, "FIXUP": False, "DEFER": True, "ASM": True,
              "XPRE": True, "PDL": 1, "PAIR": pair, "PRENORM": True, "NB": 2048}
    ptx = sm90_ptx(_gemv_planes_kernel, consts, types)
    before, after = ptx.split("griddepcontrol.wait", 1)
    assert "ld.global" not in before
    assert "rsqrt" in after  # the row's norm, after the wait


def test_decode_attention_loads_after_the_wait() -> None:
    from orbit.kernels.attention_decode import _attn_decode_split_kernel

    types = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "cnt_ptr": "*i32", "start_ptr": "*i64",
             "slot_ptr": "*i64", "qk_scale": "fp32", "eps": "fp32"}
    consts = {"GROUP": 2, "D": 128, "BLOCK_D": 128, "BLOCK_M": 16, "BLOCK_N": 64,
              "IEEE": False, "DIRECT": False, "PREFETCH": False, "PDL": 1, "SP": 8}
    ptx = sm90_ptx(_attn_decode_split_kernel, consts, types, warps=4, stages=2)
    before = ptx.split("griddepcontrol.wait", 1)[0]
    assert "ld.global" not in before
    assert "atom.global" in ptx  # the arrival counter of the chunk combine
