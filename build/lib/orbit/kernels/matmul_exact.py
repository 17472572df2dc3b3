"""Batch-invariant dense matmul y = x @ W^T, the matmul of Orbit's *exact* precision mode.

The trainer scores a sequence with one packed forward (M = thousands of rows) while the engine
produced it with decode steps (M = batch size). A library GEMM picks its kernel, tile shape and
split-K factor from M, so row i of the result depends on how many other rows came with it, and
the two sides' log-probs differ by rounding. This kernel fixes everything that decides the
arithmetic of one output element -- tile shape, warp count, no split-K, K reduced in BLOCK_K
steps from 0 upward with one float32 accumulator -- independently of M. Row i is therefore
bit-identical whether it is computed alone, in a batch of 7 or of 4096 rows. Rows beyond M are
masked (loaded as 0), they never mix into other rows. The tile config may depend on N, K and
the dtype (fixed per layer). The tile's BLOCK_M x BLOCK_N may depend on M only between configs
that share BLOCK_K and were measured to give the same bits (see DECODE_CONFIG).

Used for every dense (BF16/FP16/FP32) weight in exact mode: base linears, lm_head, LoRA A/B.
Quantized bases go through `orbit.kernels.dispatch.qmm(..., exact=True)` instead.

`matmul_exact_reference` (float64 accumulation, rounded to x.dtype) is the CPU compute path:
it is batch-invariant except when a float64 sum lands within 1e-16 (relative) of a rounding
boundary of the output dtype, which the CPU tests never hit in practice.
Backward does not need batch invariance (only forward log-probs are compared), so it uses
plain torch matmuls.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton

# One config for every M (see the module docstring). Measured on an H100 (docs/precision.md):
# 128x128x64 / 8 warps is 1.4x cuBLAS at training M and 2-3x at decode M, where the weight read
# and not the GEMM dominates a step; 64x64x64 was 2.3x at training M and 1.7x at decode M.
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
NUM_WARPS, NUM_STAGES = 8, 3
# Decode sizes (M <= DECODE_MAX_M): a 64x16 tile with the same BLOCK_K and a 6-deep pipeline
# (16x the programs of the training tile; 64x32 for outputs wider than DECODE_WIDE_N, the
# lm_head, where 64x16 was slower). `scripts/bench/exact_tiles.py --decode` (H100, session 4)
# found every tested BM x BN x warps x stages bit-identical to the training tile for bf16;
# 2048->2048 at M=32: 7.6 us (64x32x3 stages: 13.2, training tile 18.4), 6144->2048: 18.7
# (37.5). The GPU test test_matmul_exact_row_invariant checks rows across the picks.
DECODE_CONFIG = (64, 16, BLOCK_K, 4, 6)
DECODE_CONFIG_WIDE = (64, 32, BLOCK_K, 4, 6)
DECODE_WIDE_N = 16384
DECODE_MAX_M = 128
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _matmul_exact_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK]
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + kk[:, None] * stride_wk,
                    mask=nmask[None, :] & kmask[:, None], other=0.0)  # [BK, BN] = W^T tile
        b = b.to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    tl.store(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where kernels run on CPU tensors (used to test them here)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if x2d.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"matmul_exact: x must be [M, K] and weight [N, K]; got {tuple(x2d.shape)} "
                         f"and {tuple(weight.shape)}")
    if x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"matmul_exact: x has K={x2d.shape[1]} but weight has in_features={weight.shape[1]}")
    if x2d.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"matmul_exact: dtypes must be among {DTYPES}; got x {x2d.dtype}, weight {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"matmul_exact: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")


def matmul_exact_triton(x2d: Tensor, weight: Tensor, bias: Tensor | None = None,
                        config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """x2d [M, K] @ weight[N, K]^T (+ bias) -> [M, N] in x2d.dtype, batch-invariant, CUDA only.

    `config` = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the default tile
    (benchmarks only: both sides of a comparison must use the same one)."""
    _check(x2d, weight, bias)
    if not (HAS_TRITON and (x2d.is_cuda or interpreting())):
        raise RuntimeError("matmul_exact_triton needs CUDA tensors and Triton (or TRITON_INTERPRET=1)")
    assert weight.device == x2d.device, (weight.device, x2d.device)
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0:
        return y
    if M > DECODE_MAX_M:
        default = (BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES)
    else:
        default = DECODE_CONFIG_WIDE if N > DECODE_WIDE_N else DECODE_CONFIG
    bm, bn, bk, warps, stages = config or default
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _matmul_exact_kernel[grid](
        x2d, weight, bias if bias is not None else y, y,
        M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, IEEE=x2d.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    return y


def matmul_exact_reference(x2d: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same contract as `matmul_exact_triton`: W rounded to x's dtype, float64 accumulation."""
    _check(x2d, weight, bias)
    y = x2d.double() @ weight.to(x2d.dtype).double().T  # [M, N]
    if bias is not None:
        y = y + bias.double()
    return y.to(x2d.dtype)


def _forward(x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if HAS_TRITON and x2d.is_cuda:
        return matmul_exact_triton(x2d, weight, bias)
    return matmul_exact_reference(x2d, weight, bias)


class _ExactLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x2d, weight)
        ctx.has_bias = bias is not None
        return _forward(x2d, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x2d, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight.to(dy.dtype)).to(x2d.dtype)  # [M, K]
        if ctx.needs_input_grad[1]:
            dw = (dy.T.to(x2d.dtype) @ x2d).to(weight.dtype)  # [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def exact_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear` with a batch-invariant forward: x [..., K], weight [N, K] -> [..., N] in x.dtype.

    Differentiable in x, weight and bias. On CUDA the Triton kernel runs, elsewhere the float64
    reference.
    """
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = _ExactLinearFn.apply(x2d, weight, bias)
    return y.reshape(*lead, weight.shape[0])
