"""Batch-invariant RMSNorm for exact mode: one program per row, one reduction layout per width.

PyTorch's CUDA reductions choose how to split a row (threads, warps, even several blocks with
a second pass) from the *number of rows*, so `x.pow(2).mean(-1)` for a token rounds
differently in a 4096-row training forward than in an 8-row decode step. Here each row is
reduced by one program over BLOCK = next_pow2(D) lanes, a layout fixed by D alone, so row i's
result never depends on the other rows. The arithmetic is transformers' RMSNorm: normalise in
float32, cast to the input dtype, multiply by the weight (in the promoted dtype).

`rmsnorm_exact_reference` (float64 mean of squares) is the CPU path and the accuracy check.

`RMSNormFunction` wraps the kernel for autograd (backward = the standard formula, recomputed).
Fast mode on CUDA uses it too (orbit.models.transformer.RMSNorm): one launch per norm instead
of the ~6 elementwise/reduction kernels of the torch formula, which at decode sizes are pure
launch cost (4 norms per Qwen3 layer; docs/benchmarks.md, engine rows), and the trainer and the
engine then share a batch-invariant norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._autograd import reference_grads
from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.matmul_exact import interpreting
from orbit.kernels.pdl import pdl_enter, pdl_launch


@triton.jit
def _rmsnorm_exact_kernel(x_ptr, w_ptr, y_ptr, r_ptr, s_ptr, D, stride_x, stride_y, stride_r,
                          stride_s, eps, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    add_rmsnorm_row(x_ptr + row * stride_x, r_ptr + row * stride_r, w_ptr,
                    s_ptr + row * stride_s, y_ptr + row * stride_y, D, eps, BLOCK, HAS_RES,
                    False)


@triton.jit
def rms_inv(xf, D, eps):
    """1 / sqrt(mean(xf^2) + eps) of one fp32 row in one `tl.sum`: the row norm's scale,
    shared by add_rmsnorm_row and the GEMV norm prologue (norm_prologue.prenorm_inv) so both
    reduce alike."""
    return tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)


@triton.jit
def add_rmsnorm_row(x_ptr, r_ptr, w_ptr, s_ptr, y_ptr, D, eps, BLOCK: tl.constexpr,
                    HAS_RES: tl.constexpr, CG: tl.constexpr):
    """One row: (s = x + r rounded to x's dtype, stored, with HAS_RES) then y = rmsnorm(s) * w.
    CG: read x through L2 only (.cg), for a row other programs of the same launch just wrote
    (the decode GEMV's folded norm, orbit/kernels/norm_epilogue.py)."""
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    if CG:
        x = tl.load(x_ptr + cols, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if HAS_RES:  # x + r rounded to x's dtype, as torch's `x + r`, stored, then normalised
        r = tl.load(r_ptr + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    h = (xf * rms_inv(xf, D, eps)).to(x.dtype)  # HF: normalise in fp32, cast back
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm_exact: x [..., {weight.shape[0]}] expected for weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")


def rmsnorm_exact_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D], weight [D] -> [..., D] in promote(x.dtype, weight.dtype); CUDA only."""
    _check(x, weight)
    if not (HAS_TRITON and (x.is_cuda or interpreting())):
        raise RuntimeError("rmsnorm_exact_triton needs CUDA tensors and Triton")
    return _launch(x, None, weight, eps)[1]


def _rows(t: Tensor) -> Tensor:
    """t [..., D] as [R, D] rows with unit column stride (a view where possible)."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _launch(x: Tensor, r: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rmsnorm(s)) shaped like x, s = x + r (x itself without r): one kernel launch."""
    D = x.shape[-1]
    x2d = _rows(x)
    r2d = _rows(r) if r is not None else x2d
    s = torch.empty(x2d.shape, dtype=x.dtype, device=x.device) if r is not None else x2d
    y = torch.empty(x2d.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2d.shape[0]:
        _rmsnorm_exact_kernel[(x2d.shape[0],)](
            x2d, weight, y, r2d, s, D, x2d.stride(0), y.stride(0), r2d.stride(0), s.stride(0),
            eps, BLOCK=max(16, triton.next_power_of_2(D)), HAS_RES=r is not None,
            num_warps=4, **pdl_launch(x.device, x2d.shape[0]),
        )
    return (s.reshape(x.shape) if r is not None else x), y.reshape(x.shape)


def add_rmsnorm_triton(x: Tensor, r: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(s, rmsnorm(s)) with s = x + r in x's dtype, one launch; forward only (no autograd).
    Bit for bit `s = x + r` then `rmsnorm_exact_triton(s, weight, eps)`: the decoder's residual
    add fused into the norm that reads it (orbit.models.transformer, no-grad CUDA forward)."""
    _check(x, weight)
    if not (HAS_TRITON and (x.is_cuda or interpreting())):
        raise RuntimeError("add_rmsnorm_triton needs CUDA tensors and Triton")
    if x.shape != r.shape or x.dtype != r.dtype:
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)} {x.dtype} and residual "
                         f"{tuple(r.shape)} {r.dtype} must match")
    return _launch(x, r, weight, eps)


def rmsnorm_exact_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Same contract as `rmsnorm_exact_triton`, mean of squares accumulated in float64."""
    _check(x, weight)
    ms = x.double().pow(2).mean(-1, keepdim=True).float()
    h = (x.float() * torch.rsqrt(ms + eps)).to(x.dtype)
    return weight * h


def rmsnorm_exact(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Batch-invariant RMSNorm (Triton on CUDA, float64 reference elsewhere). Forward only: the
    trainer's backward goes through the reference formula (see ExactRMSNorm)."""
    if HAS_TRITON and x.is_cuda:
        return rmsnorm_exact_triton(x, weight, eps)
    return rmsnorm_exact_reference(x, weight, eps)


class RMSNormFunction(torch.autograd.Function):
    """Batch-invariant forward (`rmsnorm_exact`); backward differentiates the standard formula
    (gradients need not be batch-invariant, only the forward log-probs are compared)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return rmsnorm_exact(x, weight, eps)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx, dw = reference_grads(lambda xg, wg: rmsnorm_torch(xg, wg, ctx.eps), (x, weight),
                                 ctx.needs_input_grad[:2], dy)
        return dx, dw, None


def rmsnorm_torch(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm in torch ops: the model's CPU path and what RMSNormFunction's
    backward differentiates."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_rmsnorm_available(x: Tensor) -> bool:
    """The Triton kernel runs on `x` (CUDA tensor, Triton importable)."""
    return HAS_TRITON and x.is_cuda

