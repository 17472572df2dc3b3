"""Asymmetric int4 with an offset whose dtype differs from the scale's, on CPU.

`orbit.quant.quantize` stores a bf16 scale with the exact fp32 offset `-zero_point * scale`,
GGUF Q4_1 an fp16 scale with an fp16 offset. The int4 tile loader must take any of fp32 /
fp16 / bf16 for the offset whatever the scale dtype, and dequantize bit for bit as
`orbit.quant.qweight.dequantize` does. The loader runs under Triton's interpreter in a
subprocess (`TRITON_INTERPRET=1` must be set before any kernel is decorated, see
tests/unit/test_kernels_qmm.py), through the dequantization kernel, which calls the same
tile loader as the GEMM; fp32 output, so the comparison is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

from orbit.kernels.random_weights import random_qweight
from orbit.quant.qweight import QuantizedWeight

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
# (scale dtype, offset dtype); the first two are what quantize() and GGUF Q4_1 produce.
DTYPES = [("bfloat16", "float32"), ("float16", "float16"), ("float16", "float32"),
          ("bfloat16", "float16"), ("float16", "bfloat16")]
GROUPS = (32, 128)
# (ROWS, COLS, UNPACK): COLS <= GROUP takes one scale/offset per row, COLS > GROUP the
# [ROWS, COLS/GROUP] path of orbit/kernels/_tiles.py:group_affine.
TILES = [(16, 32, 2), (64, 128, 2), (32, 256, 0)]


def _keys() -> list[str]:
    return [f"{s}-{o}-g{g}-{r}x{c}u{u}" for s, o in DTYPES for g in GROUPS for r, c, u in TILES]


def _interpreter_main() -> None:
    """Runs in the subprocess: dequantize every case with the kernel, compare bit for bit."""
    patch_interpreter()
    from orbit.kernels._qgemm import FMT_IDS, _dequant_kernel

    out = {}
    n, k = 80, 512  # 80 rows: a partial last row tile for ROWS = 32 and 64
    for i, (sd, od) in enumerate(DTYPES):
        for g in GROUPS:
            qw = random_qweight("int4", n, k, group_size=g, asym=True, seed=i,
                                scale_dtype=getattr(torch, sd), offset_dtype=getattr(torch, od))
            t = qw.tensors
            assert t["scale"].dtype == getattr(torch, sd)
            assert t["offset"].dtype == getattr(torch, od)
            ref = qw.dequantize(torch.float32)  # [n, k]
            for rows, cols, unpack in TILES:
                w = torch.full((n, k), float("nan"))
                grid = (triton.cdiv(n, rows), triton.cdiv(k, cols))
                _dequant_kernel[grid](t["qweight"], t["scale"], t["offset"], t["scale"], w, n, k,
                                      t["qweight"].stride(0), t["scale"].stride(0), w.stride(0),
                                      FMT=FMT_IDS["int4"], GROUP=g, HAS_OFFSET=True,
                                      ROWS=rows, COLS=cols, UNPACK=unpack)
                out[f"{sd}-{od}-g{g}-{rows}x{cols}u{unpack}"] = {
                    "equal": bool(torch.equal(w, ref)),
                    "max_abs": float((w - ref).abs().nan_to_num(float("inf")).max()),
                }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("key", _keys())
def test_mixed_dtype_offset_dequantizes_bit_exact(interp_results: dict, key: str) -> None:
    r = interp_results[key]
    assert r["equal"], (key, r["max_abs"])


def test_offset_in_fp32_is_not_rounded_to_the_scale_dtype() -> None:
    """The fp32 offsets above must carry bits a bf16 offset cannot, or the check is vacuous."""
    qw = random_qweight("int4", 80, 512, group_size=32, asym=True, seed=0,
                        scale_dtype=torch.bfloat16, offset_dtype=torch.float32)
    o = qw.tensors["offset"]
    assert not torch.equal(o.bfloat16().float(), o)
    assert not torch.equal(qw.dequantize(), QuantizedWeight(
        "int4", qw.shape, dict(qw.tensors, offset=o.bfloat16()), 32).dequantize())


def test_wrapper_accepts_any_float_offset_and_rejects_bad_ones() -> None:
    from orbit.kernels.int4 import _check

    x = torch.randn(3, 256).bfloat16()
    for sd, od in DTYPES + [("float32", "float32"), ("bfloat16", "bfloat16")]:
        qw = random_qweight("int4", 64, 256, group_size=32, asym=True,
                            scale_dtype=getattr(torch, sd), offset_dtype=getattr(torch, od))
        _check(x, qw, transpose=False)
        _check(torch.randn(3, 64).half(), qw, transpose=True)
    qw = random_qweight("int4", 64, 256, group_size=32, asym=True, offset_dtype=torch.float32)
    t = qw.tensors
    bad = {  # scale is [64, 8] contiguous (in 256 / group 32)
        "offset must be fp32/fp16/bf16": dict(t, offset=t["offset"].to(torch.int32)),
        "'offset' must have shape": dict(t, offset=t["offset"][:, :4]),
        "row stride": dict(t, offset=torch.zeros(64, 16)[:, :8]),  # row stride 16, not 8
    }
    for msg, tensors in bad.items():  # the wrapper's own checks (a weight built unchecked)
        with pytest.raises(ValueError, match=msg):
            _check(x, QuantizedWeight.trusted("int4", (64, 256), tensors, 32), transpose=False)
    # the constructor already refuses the first two, naming the tensor and its layout
    for tensors in list(bad.values())[:2]:
        with pytest.raises(ValueError, match=r"int4 weight \[64 x 256\]: tensor 'offset' is"):
            QuantizedWeight("int4", (64, 256), tensors, 32)

if __name__ == "__main__":
    _interpreter_main()
