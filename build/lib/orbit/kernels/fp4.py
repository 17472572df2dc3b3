"""NVFP4 and MXFP4 weight-only matmuls: E2M1 tile loaders, wrappers and torch references.

Both formats pack two E2M1 codes per byte (even column in the low nibble) in `qweight` uint8
[out, in/2]. NVFP4 scales 16-element groups by an e4m3 `scale` times an fp32 `global_scale`;
MXFP4 scales 32-element groups by an E8M0 byte (2^(e-127)).

E2M1 decoding: instead of gathering from a 16-entry table, the loader moves the code's
3 magnitude bits into an fp16's exponent/mantissa field and the sign bit onto fp16's sign,
then multiplies by 2^14. That is the table lookup `E2M1_VALUES[code]` exactly (the unit
tests compare all 16 codes through the kernels), and costs two shifts instead of a gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._tiles import group_affine, unpack_nibbles
from orbit.kernels._triton import tl, triton
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.quant.qweight import MXFP4_GROUP, NVFP4_GROUP, QuantizedWeight


@triton.jit
def e2m1_scaled(codes):
    """int32 codes 0..15 -> float32 E2M1 values times 2^-14 (through the fp16 bits; callers
    that apply a scale anyway fold the 2^14 into it)."""
    bits = ((codes & 7) << 9) | ((codes & 8) << 12)  # fp16 bits of value * 2^-14
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1(codes):
    """int32 codes 0..15 -> float32 values {0, .5, 1, 1.5, 2, 3, 4, 6} with bit 3 as sign."""
    return e2m1_scaled(codes) * 16384.0


@triton.jit
def e8m0_scale(e):
    """E8M0 exponent bytes (as int32) -> float32 2^(e-127): the fp32 whose exponent field is
    e; e == 0 is the subnormal 2^-127."""
    return tl.where(e == 0, 5.877471754111438e-39, (e << 23).to(tl.float32, bitcast=True))


@triton.jit
def nvfp4_tile(q_ptr, s_ptr, g_ptr, stride_q, stride_s, n0, k0, N, K,
               ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    """W[n0:n0+ROWS, k0:k0+COLS] in float32 (COLS >= 16)."""
    offs_n = n0 + tl.arange(0, ROWS)
    row_ok = offs_n < N
    v = _e2m1(unpack_nibbles(q_ptr, stride_q, offs_n, row_ok, k0, K, 2, ROWS, COLS, UNPACK))
    gs = tl.load(g_ptr).to(tl.float32)
    vs = group_affine(v, s_ptr, s_ptr, stride_s, offs_n, row_ok, k0, K, 16, False, ROWS, COLS)
    return vs * gs  # (v * s) * gs: the reference's order


@triton.jit
def mxfp4_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K,
               ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    """W[n0:n0+ROWS, k0:k0+COLS] in float32 (COLS >= 32)."""
    offs_n = n0 + tl.arange(0, ROWS)
    row_ok = offs_n < N
    v = _e2m1(unpack_nibbles(q_ptr, stride_q, offs_n, row_ok, k0, K, 2, ROWS, COLS, UNPACK))
    offs_g = k0 // 32 + tl.arange(0, COLS // 32)
    e = tl.load(s_ptr + offs_n[:, None] * stride_s + offs_g[None, :],
                mask=row_ok[:, None] & (offs_g[None, :] < K // 32), other=0).to(tl.int32)
    s = e8m0_scale(e)
    w3 = tl.reshape(v, (ROWS, COLS // 32, 32)) * s[:, :, None]  # [ROWS, COLS/32, 32]
    return tl.reshape(w3, (ROWS, COLS))


def _check(x: Tensor, qw: QuantizedWeight, fmt: str, transpose: bool) -> None:
    from orbit.kernels._qgemm import check_activation, check_tensor  # _qgemm imports this module

    out_f, in_f = qw.shape
    group = NVFP4_GROUP if fmt == "nvfp4" else MXFP4_GROUP
    if qw.fmt != fmt:
        raise ValueError(f"{fmt}_matmul got a {qw.fmt!r} weight")
    if in_f % group:
        raise ValueError(f"{fmt} needs in_features % {group} == 0, got in={in_f}")
    t = qw.tensors
    check_tensor(t["qweight"], "qweight", torch.uint8, (out_f, in_f // 2))
    if fmt == "nvfp4":
        check_tensor(t["scale"], "scale", torch.float8_e4m3fn, (out_f, in_f // group))
        gs = t["global_scale"]
        if gs.numel() != 1 or gs.dtype != torch.float32:
            raise ValueError(f"nvfp4 global_scale must be one float32, got {gs.dtype} {tuple(gs.shape)}")
    else:
        check_tensor(t["scale"], "scale", torch.uint8, (out_f, in_f // group))
    check_activation(x, "dy" if transpose else "x", out_f if transpose else in_f, t["qweight"].device)


def _fp4_matmul(x: Tensor, qw: QuantizedWeight, fmt: str, transpose: bool, exact: bool,
                out: Tensor | None, lora: LoRAEpilogue | None = None,
                swiglu: bool = False, norm: NormEpilogue | None = None) -> Tensor:
    from orbit.kernels._qgemm import launch

    _check(x, qw, fmt, transpose)
    t = qw.tensors
    gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
    group = NVFP4_GROUP if fmt == "nvfp4" else MXFP4_GROUP
    return launch(x, fmt, qw.shape, t["qweight"], t["scale"], None, gs, group, transpose, exact, out,
                  lora=lora, swiglu=swiglu, norm=norm)


def nvfp4_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                 exact: bool = False, out: Tensor | None = None,
                lora: LoRAEpilogue | None = None, swiglu: bool = False,
                norm: NormEpilogue | None = None) -> Tensor:
    """x [M, in] @ W^T -> [M, out]; with transpose, dy [M, out] @ W -> [M, in]. Fused kernel.
    `lora`: a `lora_epilogue.LoRAEpilogue` added in the decode GEMV's store; `swiglu`, `norm`:
    see `_qgemm.launch`."""
    return _fp4_matmul(x, qw, "nvfp4", transpose, exact, out, lora, swiglu, norm)


def mxfp4_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                 exact: bool = False, out: Tensor | None = None,
                lora: LoRAEpilogue | None = None, swiglu: bool = False,
                norm: NormEpilogue | None = None) -> Tensor:
    """x [M, in] @ W^T -> [M, out]; with transpose, dy [M, out] @ W -> [M, in]. Fused kernel.
    `lora`: a `lora_epilogue.LoRAEpilogue` added in the decode GEMV's store; `swiglu`, `norm`:
    see `_qgemm.launch`."""
    return _fp4_matmul(x, qw, "mxfp4", transpose, exact, out, lora, swiglu, norm)


def fp4_matmul_reference(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                         exact: bool = False) -> Tensor:
    """Same contract as `nvfp4_matmul` / `mxfp4_matmul`, in plain PyTorch."""
    w = qw.dequantize(x.dtype)  # [out, in]
    return x @ w if transpose else x @ w.T


nvfp4_matmul_reference = fp4_matmul_reference
mxfp4_matmul_reference = fp4_matmul_reference
