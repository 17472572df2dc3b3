"""INT8 weight-only matmul (W8A16): the int8 tile loader, its wrapper and the torch reference.

Layout: `qweight` int8 [out, in], `scale` [out, in/g] (g = 32 for GGUF Q8_0-style weights).
The loader computes `q * scale` in float32 like `orbit.quant.qweight.dequantize`, so the
kernel's BF16 weights equal the reference's exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._tiles import group_affine
from orbit.kernels._triton import tl, triton
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.quant.qweight import QuantizedWeight

INT8_GROUPS = (32, 64, 128)


@triton.jit
def int8_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K,
              GROUP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """W[n0:n0+ROWS, k0:k0+COLS] in float32; k0 is a multiple of COLS."""
    offs_n = n0 + tl.arange(0, ROWS)
    offs_k = k0 + tl.arange(0, COLS)
    row_ok = offs_n < N
    q = tl.load(q_ptr + offs_n[:, None] * stride_q + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k[None, :] < K), other=0).to(tl.float32)
    return group_affine(q, s_ptr, s_ptr, stride_s, offs_n, row_ok, k0, K, GROUP, False,
                        ROWS, COLS)


def _check(x: Tensor, qw: QuantizedWeight, transpose: bool) -> None:
    from orbit.kernels._qgemm import check_activation, check_tensor  # _qgemm imports this module

    out_f, in_f = qw.shape
    g = qw.group_size
    if qw.fmt != "int8":
        raise ValueError(f"int8_matmul got a {qw.fmt!r} weight")
    if g not in INT8_GROUPS or in_f % g:
        raise ValueError(f"int8 group_size must be one of {INT8_GROUPS} and divide in={in_f}, got {g}")
    t = qw.tensors
    check_tensor(t["qweight"], "qweight", torch.int8, (out_f, in_f))
    sdt = t["scale"].dtype
    if sdt not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"int8 scale must be bf16/fp16/fp32, got {sdt}")
    check_tensor(t["scale"], "scale", sdt, (out_f, in_f // g))
    check_activation(x, "dy" if transpose else "x", out_f if transpose else in_f, t["qweight"].device)


def int8_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                exact: bool = False, out: Tensor | None = None,
                lora: LoRAEpilogue | None = None, norm: NormEpilogue | None = None) -> Tensor:
    """x [M, in] @ W^T -> [M, out]; with transpose, dy [M, out] @ W -> [M, in]. Fused kernel.
    `lora`: a `lora_epilogue.LoRAEpilogue` added in the decode GEMV's store; `norm`: see
    `_qgemm.launch`."""
    from orbit.kernels._qgemm import launch

    _check(x, qw, transpose)
    t = qw.tensors
    return launch(x, "int8", qw.shape, t["qweight"], t["scale"], None, None,
                  qw.group_size, transpose, exact, out, lora=lora, norm=norm)


def int8_matmul_reference(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                          exact: bool = False) -> Tensor:
    """Same contract as `int8_matmul`, in plain PyTorch."""
    w = qw.dequantize(x.dtype)  # [out, in]
    return x @ w if transpose else x @ w.T
