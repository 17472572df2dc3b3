"""INT4 weight-only matmul (W4A16): the int4 tile loader, its wrapper and the torch reference.

Layout (docs/architecture.md): `qweight` int32 [out, in/8], element j of a word at bits
4j..4j+3; `scale` [out, in/g] bf16/fp16; optional `offset` [out, in/g] (asymmetric) in
fp32, fp16 or bf16 whatever the scale dtype: `orbit.quant.quantize` stores the exact fp32
`-zero_point * scale` beside a bf16 scale, GGUF Q4_1 an fp16 `m` beside an fp16 `d`.
The tile loader reproduces `orbit.quant.qweight.dequantize` bit for bit in float32
(`(u - 8) * s` or `u * s + o`, scale and offset each loaded and widened to fp32; `u * s` is
exact in fp32 for a bf16/fp16 scale, so a fused multiply-add rounds the same), so kernel and
reference see identical BF16 weights and differ only in summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._tiles import group_affine, unpack_nibbles
from orbit.kernels._triton import tl, triton
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.quant.qweight import QuantizedWeight

INT4_GROUPS = (32, 64, 128)
INT4_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_OFFSET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def int4_codes(u, SYMMETRIC: tl.constexpr):
    """int32 codes 0..15 -> float32 u - 8 (symmetric) or u, without a convert instruction
    (those run at 1/8 of the FMA rate on the H100): OR-ing u into the mantissa of 2^23 is the
    float 2^23 + u, and subtracting 2^23 (or 2^23 + 8) leaves the value exactly."""
    bias = 8388616.0 if SYMMETRIC else 8388608.0
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - bias


@triton.jit
def int4_tile(q_ptr, s_ptr, o_ptr, stride_q, stride_s, n0, k0, N, K,
              GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
              ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    """W[n0:n0+ROWS, k0:k0+COLS] in float32; k0 is a multiple of COLS (and of 8)."""
    offs_n = n0 + tl.arange(0, ROWS)
    row_ok = offs_n < N
    u = unpack_nibbles(q_ptr, stride_q, offs_n, row_ok, k0, K, 8, ROWS, COLS, UNPACK)
    # exact in fp32, as is the product with a bf16/fp16 scale
    u = int4_codes(u, not HAS_OFFSET)
    return group_affine(u, s_ptr, o_ptr, stride_s, offs_n, row_ok, k0, K, GROUP, HAS_OFFSET,
                        ROWS, COLS)


def _check(x: Tensor, qw: QuantizedWeight, transpose: bool) -> None:
    from orbit.kernels._qgemm import check_activation, check_tensor  # _qgemm imports this module

    out_f, in_f = qw.shape
    g = qw.group_size
    if qw.fmt != "int4":
        raise ValueError(f"int4_matmul got a {qw.fmt!r} weight")
    if g not in INT4_GROUPS or in_f % g:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUPS} and divide in={in_f}, got {g}")
    t = qw.tensors
    check_tensor(t["qweight"], "qweight", torch.int32, (out_f, in_f // 8))
    sdt = t["scale"].dtype
    if sdt not in INT4_SCALE_DTYPES:
        raise ValueError(f"int4 scale must be bf16/fp16/fp32, got {sdt}")
    check_tensor(t["scale"], "scale", sdt, (out_f, in_f // g))
    if "offset" in t:
        # The tile loader widens the offset to fp32 on load, so its dtype is independent of
        # the scale's; the kernel indexes both with the scale's row stride (in elements).
        odt = t["offset"].dtype
        if odt not in INT4_OFFSET_DTYPES:
            raise ValueError(f"int4 offset must be fp32/fp16/bf16, got {odt}")
        check_tensor(t["offset"], "offset", odt, (out_f, in_f // g))
        if t["offset"].stride(0) != t["scale"].stride(0):
            raise ValueError(f"int4 offset and scale must share a row stride (in elements), got "
                             f"{t['offset'].stride(0)} and {t['scale'].stride(0)}")
    check_activation(x, "dy" if transpose else "x", out_f if transpose else in_f, t["qweight"].device)


def int4_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                exact: bool = False, out: Tensor | None = None,
                lora: LoRAEpilogue | None = None, swiglu: bool = False,
                norm: NormEpilogue | None = None) -> Tensor:
    """x [M, in] @ W^T -> [M, out]; with transpose, dy [M, out] @ W -> [M, in]. Fused kernel.
    `lora`: a `lora_epilogue.LoRAEpilogue` added in the decode GEMV's store; `swiglu`, `norm`:
    see `_qgemm.launch`."""
    from orbit.kernels._qgemm import launch

    _check(x, qw, transpose)
    t = qw.tensors
    return launch(x, "int4", qw.shape, t["qweight"], t["scale"], t.get("offset"), None,
                  qw.group_size, transpose, exact, out, lora=lora,
                  swiglu=swiglu, norm=norm)


def int4_matmul_reference(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                          exact: bool = False) -> Tensor:
    """Same contract as `int4_matmul`, in plain PyTorch (dequantize, then matmul)."""
    w = qw.dequantize(x.dtype)  # [out, in]
    return x @ w if transpose else x @ w.T
