"""The plane GEMV's scale loads off the per-step critical path: GemvConfig.s_words (symmetric
INT4's bf16 scales loaded as int32 words, which the K loop's cp.async pipeline carries) and
GemvConfig.s_prefetch (the next step's scales loaded in registers during the current one).
Under Triton's interpreter, on fresh random inputs, for every nibble-plane format (int4
symmetric and asymmetric, nvfp4, mxfp4; s_words applies to symmetric int4 only), 1 and 3
rows, deferred and per-step reduction, with and without split-K, x prefetch and a preloaded
first step, the output equals the same config's without them bit for bit; and the sm_90 PTX
shows where the loads go."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sm90_ptx import sm90_ptx
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, K, N, M, GemvConfig fields)
CASES = [
    ("int4", {"group_size": 32}, 512, 48, 1,
     {"block_n": 16, "block_k": 64, "split": 1, "x_prefetch": True}),
    ("int4", {"group_size": 32}, 512, 40, 1,
     {"block_n": 32, "block_k": 64, "split": 3, "stages": 2, "x_prefetch": True}),
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 640, 64, 3,
     {"block_n": 32, "block_k": 128, "split": 1, "defer": False}),
    ("nvfp4", {}, 512, 32, 1,
     {"block_n": 8, "block_k": 64, "split": 1, "warps": 1, "x_prefetch": True, "e2m1": 2}),
    ("mxfp4", {}, 512, 24, 3, {"block_n": 16, "block_k": 64, "split": 2, "defer": False}),
]


def _interpreter_main() -> None:
    import json

    patch_interpreter(bf16_dot=True, bf16_round=True)
    from orbit.kernels import gemv
    from orbit.kernels.random_weights import gemv_operands, random_qweight

    out = {}
    for i, (fmt, kw, k, n, m, c) in enumerate(CASES):
        g = torch.Generator().manual_seed(500 + i)
        ops = gemv_operands(random_qweight(fmt, n, k, seed=510 + i, **kw))
        x = torch.randn(m, k, generator=g).bfloat16()
        base = gemv.GemvConfig(**{"warps": 4, "stages": 3, **c})
        for wpre in (0, 1):
            ys = []
            for extra in ({}, {"s_prefetch": True}, {"s_words": True}):
                cfg = dataclasses.replace(base, w_preload=wpre, **extra)
                y = torch.full((m, n), float("nan")).bfloat16()
                ys.append(gemv.gemv(x, *ops, y, cfg))
            out[f"{i}-{wpre}"] = {"nan": any(bool(y.isnan().any()) for y in ys),
                                  "equal": all(torch.equal(ys[0], y) for y in ys[1:])}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("wpre", [0, 1])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_scale_prefetch_gives_the_same_bits(interp: dict, case: int, wpre: int) -> None:
    r = interp[f"{case}-{wpre}"]
    assert not r["nan"] and r["equal"], r


def _loop_ptx(**consts) -> str:
    """The K loop body of the sm_90 PTX of the INT4 M = 1 plane GEMV (the shipped form plus
    `consts`)."""
    from orbit.kernels._qgemm import FMT_IDS
    from orbit.kernels.gemv import _gemv_planes_kernel

    types = {"out_ptr": "*fp32", "q_ptr": "*i32", "g_ptr": "*fp32", "cnt_ptr": "*i32",
             "ncnt_ptr": "*i32", "lscale": "fp32", "eps": "fp32"}
    base = {"FMT": FMT_IDS["int4"], "CODE": 0, "GROUP": 128, "HAS_OFFSET": False, "MP": 1,
            "BN": 16, "NG": 4, "STAGES": 3, "FIXUP": True, "DEFER": True, "ASM": True,
            "XPRE": True, "PDL": 1}
    ptx = sm90_ptx(_gemv_planes_kernel, {**base, **consts}, types)
    return ptx.split("Inner Loop Header", 1)[1].split("_crit_edge", 1)[0]


def test_scale_words_ride_the_cp_async_pipeline() -> None:
    """sm_90 PTX: the shipped loop carries only the packed words in cp.async and loads the
    bf16 scales with 2-byte global loads next to x's (8 each per thread); with s_words the
    scales join the cp.async groups and the only 2-byte global loads left are x's; the one-
    step register prefetch keeps the words in cp.async (a two-step one did not)."""
    plain, words, pre = _loop_ptx(), _loop_ptx(SW=True), _loop_ptx(SPRE=True)
    assert plain.count("ld.global.b16") == 16 and plain.count("cp.async.ca") == 8
    assert words.count("ld.global.b16") == 8 and words.count("cp.async.ca") > 8
    assert pre.count("cp.async.ca") == 8 and "ld.global.b32" not in pre


if __name__ == "__main__":
    _interpreter_main()
