"""The decoder's residual add + RMSNorm folded into the decode GEMV that reads the normed row.

In a fast-mode decode step each o_proj and down_proj GEMV is followed by one launch of
`add_rmsnorm_triton` (s = residual + delta, x = rmsnorm(s) * w), whose x the next GEMV (the
stacked q/k/v, or gate/up + SwiGLU) reads. With a `NormPrologue` that next GEMV is handed the
delta instead of x and does the add + norm itself: every program first reads the M rows of
delta and residual whole (a few KB from L2), reduces each row's mean square and keeps
inv = 1 / sqrt(ms + eps); its K loop then builds the x elements it meets from delta,
residual and the norm weight (`prenorm_x`). The first program also stores s, the residual the
rest of the layer reads. One launch per norm fewer, and, unlike the epilogue fold
(orbit/kernels/norm_epilogue.py, measured slower), no serial tail: the work is repeated in
every program, in parallel, at the cost of one more L2 round trip before the K loop.

Same arithmetic as the separate launch (`rmsnorm_exact.add_rmsnorm_row`): s rounded to the
activation dtype, the mean square of s in fp32 over the row in one `tl.sum`, h = s * inv
rounded to the dtype, x = w * h rounded to the dtype. The bits are equal wherever the row
reduction gets the same layout (BLOCK = next_pow2(K) and the launch's warps: the separate
launch uses 4, as the INT4 GEMVs at M = 1 do; the interpreter: always equal).

Where it runs: the nibble-plane decode GEMV (int4, nvfp4, mxfp4) with no LoRA epilogue (an
adapter's shrink reads x, which this launch never materializes) and no norm epilogue. The
engine takes it, for the formats in PROLOGUE_FORMATS, with `Engine(fold_norm="prologue")`
(AttnBatch.fold_norm, the default), measured in docs/rollout.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton
from orbit.kernels.rmsnorm_exact import rms_inv

# The formats whose decode GEMVs the engine hands a prologue (dispatch.prenorm_foldable). The
# kernel runs every plane format; the engine takes it where it measured faster: H100, session
# 20, Qwen3-1.7B batch 1, same process, off -> prologue: INT4 761.7 -> 765.6 and 765.8 ->
# 766.6 tok/s (with the roofline runs' three pairs, +0.1 to +0.65%), NVFP4 683.8 -> 665.9 and
# 681.1 -> 665.9 (-2.5%; not profiled: its M = 1 programs are one warp each, so each one
# reduces the 2048-value row alone before its K loop); batch 16 equal for both. MXFP4 not
# measured.
PROLOGUE_FORMATS: tuple[str, ...] = ("int4",)


@dataclass(frozen=True)
class NormPrologue:
    """What the GEMV computes before its K loop, for x given as the delta [M, K]:
    s = residual + delta (stored into `s` by the first program), and the GEMV's input
    rmsnorm(s, eps) * weight, never stored. residual and s are contiguous [M, K] in the
    delta's dtype; weight is [K] in that dtype too."""

    residual: Tensor
    weight: Tensor
    eps: float
    s: Tensor

    @staticmethod
    def make(residual: Tensor, weight: Tensor, eps: float) -> NormPrologue:
        """A fresh s shaped like the residual."""
        residual = residual.contiguous()
        return NormPrologue(residual, weight, eps, torch.empty_like(residual))

    def check(self, delta: Tensor) -> None:
        m, k = delta.shape
        for name, t in (("residual", self.residual), ("s", self.s)):
            if t.shape != (m, k) or not t.is_contiguous():
                raise ValueError(f"norm prologue: {name} must be contiguous [{m}, {k}] like the "
                                 f"GEMV input; got {tuple(t.shape)} strides {t.stride()}")
            if t.dtype != delta.dtype:
                raise ValueError(f"norm prologue: {name} is {t.dtype}; the GEMV input (the "
                                 f"delta) is {delta.dtype}")
        if not delta.is_contiguous():
            raise ValueError(f"norm prologue: the delta must be contiguous, got strides "
                             f"{delta.stride()}")
        if self.weight.shape != (k,) or self.weight.dtype != delta.dtype:
            raise ValueError(f"norm prologue: weight must be [{k}] {delta.dtype}, got "
                             f"{tuple(self.weight.shape)} {self.weight.dtype}")
        if self.s.data_ptr() in (self.residual.data_ptr(), delta.data_ptr()):
            raise ValueError("norm prologue: s must not alias the residual or the delta (the "
                             "first program stores it while the others read them)")


def prologue_kernel_args(pre: NormPrologue, x: Tensor, dummy: Tensor) -> tuple[tuple, dict]:
    """The plane GEMV's norm argument slots (r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps)
    and constexprs (NORM, NB, PRENORM) for a prologue: the norm epilogue's slots, which the
    two never share (`dummy` fills the epilogue-only pointers)."""
    pre.check(x)
    return ((pre.residual, pre.weight, pre.s, dummy, dummy, 1, float(pre.eps)),
            {"NORM": False, "PRENORM": True, "NB": max(16, triton.next_power_of_2(x.shape[1]))})


@triton.jit
def prenorm_inv(x_ptr, r_ptr, s_ptr, stride_xm, M, K, eps, first, MP: tl.constexpr,
                NB: tl.constexpr):
    """inv [MP] fp32 = 1 / sqrt(mean(s^2) + eps) of each row s = x + r (rounded to x's
    dtype, as add_rmsnorm_row); `first` (a program-id test) stores s. Rows past M: 0 sums."""
    cols = tl.arange(0, NB)
    am = tl.arange(0, MP)
    inv = tl.zeros((MP,), dtype=tl.float32)
    for m in tl.static_range(MP):
        ok = (cols < K) & ((cols * 0 + m) < M)
        d = tl.load(x_ptr + m * stride_xm + cols, mask=ok, other=0.0)
        r = tl.load(r_ptr + m * stride_xm + cols, mask=ok, other=0.0)
        s = (d.to(tl.float32) + r.to(tl.float32)).to(d.dtype)
        tl.store(s_ptr + m * stride_xm + cols, s, mask=ok & ((cols * 0 + first) != 0))
        inv = tl.where(am == m, rms_inv(s.to(tl.float32), K, eps), inv)
    return inv


@triton.jit
def prenorm_x(x_ptr, r_ptr, nw_ptr, inv, off, koff, ok):
    """The GEMV input at x offsets `off` (weight offsets `koff`, same shape): rmsnorm(x + r) *
    w as add_rmsnorm_row rounds it, in fp32; inv broadcast to the offsets' shape."""
    d = tl.load(x_ptr + off, mask=ok, other=0.0)
    r = tl.load(r_ptr + off, mask=ok, other=0.0)
    s = (d.to(tl.float32) + r.to(tl.float32)).to(d.dtype)
    h = (s.to(tl.float32) * inv).to(d.dtype)
    w = tl.load(nw_ptr + koff, mask=ok, other=0.0)
    return (w.to(tl.float32) * h.to(tl.float32)).to(d.dtype).to(tl.float32)
