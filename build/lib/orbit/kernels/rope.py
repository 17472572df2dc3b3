"""Fused (optional RMSNorm) + rotary embedding of q or k heads: one launch instead of ~7.

In torch, Qwen3's per-head QK-norm plus RoPE is a norm (one launch with the fused RMSNorm)
and then `x * cos + rotate_half(x) * sin`: a chunk, a negation, a cat, two multiplies and an
add, each a kernel over the whole [T, H, D] tensor. At decode sizes these are pure launch
cost (about 14 launches per layer for q and k; docs/benchmarks.md, engine profile), so on
CUDA one program per (token, head) row does it all in registers.

Arithmetic: the norm is exactly `RMSNorm`'s (fp32 normalise, cast to x's dtype, multiply by
the weight in the promoted dtype, which is the dtype RoPE sees); RoPE is then computed in
float32 from those values and rounded once (the torch path rounds after each multiply and
after the add, so the two differ by bf16 rounding). Each row is computed by one program with
a layout fixed by D, so a row's bits do not depend on the batch: exact mode can use it on
both the trainer and the engine side.

`norm_rope_reference` is the torch formula (the CPU path); `NormRopeFunction` differentiates
the reference in backward (recomputed from the saved input; the training backward is not
launch-bound).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._autograd import reference_grads
from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.matmul_exact import interpreting
from orbit.kernels.pdl import L2Prefetch, l2_prefetch_args, pdl_enter, pdl_launch, prefetch_table_l2
from orbit.kernels.rmsnorm_exact import rmsnorm_torch


@triton.jit
def _norm_rope_row(x_row, w_ptr, cos_row, sin_row, eps, D: tl.constexpr,
                   HAS_NORM: tl.constexpr, OUT: tl.constexpr):
    """One [D] head row: optional RMSNorm (HF rounding, output dtype OUT), then RoPE in
    float32; returned in float32 (the caller rounds once to OUT)."""
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    partner = (d + half) % D  # rotate_half: [-x2, x1]
    x = tl.load(x_row + d)
    xp = tl.load(x_row + partner)
    r = 1.0
    if HAS_NORM:
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    return _norm_rope_math(x, xp, r, w_ptr, cos_row, sin_row, d, partner, d < half, HAS_NORM,
                           OUT)


@triton.jit
def _norm_rope_math(x, xp, r, w_ptr, cos_row, sin_row, d, partner, first_half, HAS_NORM: tl.constexpr,
                    OUT: tl.constexpr):
    """The elementwise part of norm + RoPE for values x and their rotate_half partners xp (one
    row [D], or rows [R, D] with d, partner and first_half broadcast as [1, D] and r as
    [R, 1]), given the RMSNorm factor r: shared by the one-row and the GQA-tile forms."""
    if HAS_NORM:
        xf = x.to(tl.float32)
        w = tl.load(w_ptr + d).to(tl.float32)
        wp = tl.load(w_ptr + partner).to(tl.float32)
        # HF RMSNorm rounding: normalise in fp32, cast to x's dtype, scale, cast to the output
        a = (w * (xf * r).to(x.dtype).to(tl.float32)).to(OUT).to(tl.float32)
        b = (wp * (xp.to(tl.float32) * r).to(x.dtype).to(tl.float32)).to(OUT)
        b = b.to(tl.float32)
    else:
        a = x.to(tl.float32)
        b = xp.to(tl.float32)
    b = tl.where(first_half, -b, b)
    c = tl.load(cos_row + d).to(tl.float32)
    s = tl.load(sin_row + d).to(tl.float32)
    return a * c + b * s


@triton.jit
def norm_rope_rows(x_ptr, stride_h, h, rmask, w_ptr, cos_row, sin_row, eps, D: tl.constexpr,
                   HAS_NORM: tl.constexpr, OUT: tl.constexpr):
    """`_norm_rope_row` for several head rows h [R] of one token at once (rows past rmask read
    zeros), [R, D] float32: the decode attention's GQA tile normalises and rotates its query
    heads itself (orbit/kernels/attention_decode.py). The same per-element arithmetic; the
    norm's sum over D runs in this tile's layout, so it may differ from the one-row launch's
    in the last bit (fast mode only)."""
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    partner = (d + half) % D
    m2 = rmask[:, None]
    x = tl.load(x_ptr + h[:, None] * stride_h + d[None, :], mask=m2, other=0.0)
    xp = tl.load(x_ptr + h[:, None] * stride_h + partner[None, :], mask=m2, other=0.0)
    r = tl.full((x.shape[0], 1), 1.0, tl.float32)
    if HAS_NORM:
        xf = x.to(tl.float32)
        r = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
    return _norm_rope_math(x, xp, r, w_ptr, cos_row, sin_row, d[None, :], partner[None, :],
                           (d < half)[None, :], HAS_NORM, OUT)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr,
                      H, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, eps,
                      D: tl.constexpr, HAS_NORM: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    out = y_ptr.dtype.element_ty
    y = _norm_rope_row(x_ptr + t * stride_xt + h * stride_xh, w_ptr, cos_ptr + t * stride_ct,
                       sin_ptr + t * stride_ct, eps, D, HAS_NORM, out)
    tl.store(y_ptr + t * stride_yt + h * stride_yh + tl.arange(0, D), y.to(out))


@triton.jit
def _qk_norm_rope_kv_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, qo_ptr,
                            kc_ptr, vc_ptr, slot_ptr, pos_ptr, H, HKV, stride_qt, stride_qh,
                            stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                            stride_ct, stride_cs, stride_cp, stride_ch, eps, pf_addr_ptr,
                            pf_size_ptr, PF_N, D: tl.constexpr, HAS_NORM: tl.constexpr,
                            PDL: tl.constexpr = False, PF_PER: tl.constexpr = 0,
                            PF_LANES: tl.constexpr = 128):
    # Program (t, h): head rows h < H are q's (norm + RoPE into qo), the next HKV are k's
    # (norm + RoPE straight into the cache at (slot[t], pos[t])), the last HKV are v's (a copy
    # into the cache). Each row's arithmetic is _norm_rope_kernel's, so the bits are those of
    # norm_rope_triton for q and k followed by kv_write. PF_PER > 0: first this program's share
    # of an L2 prefetch table (pdl.L2Prefetch: frozen weights, before the wait; a hint).
    if PF_PER > 0:
        prefetch_table_l2(pf_addr_ptr, pf_size_ptr, PF_N,
                          tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), PF_PER,
                          PF_LANES)
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, D)
    out = qo_ptr.dtype.element_ty
    if h < H:
        y = _norm_rope_row(q_ptr + t * stride_qt + h * stride_qh, qw_ptr, cos_ptr + t * stride_ct,
                           sin_ptr + t * stride_ct, eps, D, HAS_NORM, out)
        tl.store(qo_ptr + t * stride_ot + h * stride_oh + d, y.to(out))
    else:
        dst = (tl.load(slot_ptr + t).to(tl.int64) * stride_cs
               + tl.load(pos_ptr + t).to(tl.int64) * stride_cp + d)
        if h < H + HKV:
            hk = h - H
            y = _norm_rope_row(k_ptr + t * stride_kt + hk * stride_kh, kw_ptr,
                               cos_ptr + t * stride_ct, sin_ptr + t * stride_ct, eps, D,
                               HAS_NORM, out)
            tl.store(kc_ptr + dst + hk * stride_ch, y.to(out))
        else:
            hv = h - H - HKV
            tl.store(vc_ptr + dst + hv * stride_ch, tl.load(v_ptr + t * stride_vt + hv * stride_vh + d))


def _check(x: Tensor, weight: Tensor | None, cos: Tensor, sin: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"norm_rope: x must be [T, H, D], got {tuple(x.shape)}")
    T, _, D = x.shape
    if D % 2:
        raise ValueError(f"norm_rope: head dim must be even, got {D}")
    if cos.shape != (T, D) or sin.shape != (T, D):
        raise ValueError(f"norm_rope: cos/sin must be [{T}, {D}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if weight is not None and weight.shape != (D,):
        raise ValueError(f"norm_rope: weight must be [{D}], got {tuple(weight.shape)}")


def norm_rope_reference(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, H, D] -> RMSNorm(x) * weight (if weight is given), then RoPE with cos/sin [T, D]:
    the model's torch formulas, rounding after each op."""
    _check(x, weight, cos, sin)
    if weight is not None:
        x = rmsnorm_torch(x, weight, eps)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None, :] + torch.cat((-x2, x1), dim=-1) * sin[:, None, :]


def norm_rope_triton(x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """Same contract as `norm_rope_reference` (output dtype: promote(x, weight), as the norm's),
    one launch; CUDA (or Triton's interpreter)."""
    _check(x, weight, cos, sin)
    if not (HAS_TRITON and (x.is_cuda or interpreting())):
        raise RuntimeError("norm_rope_triton needs CUDA tensors and Triton")
    T, H, D = x.shape
    if D & (D - 1):
        raise ValueError(f"norm_rope_triton: head dim must be a power of two, got {D}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    y = torch.empty((T, H, D), dtype=dtype, device=x.device)
    if T and H:
        _norm_rope_kernel[(T, H)](
            x, weight if weight is not None else x, cos, sin, y,
            H, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0), eps,
            D=D, HAS_NORM=weight is not None, num_warps=1 if D <= 128 else 2,
            **pdl_launch(x.device, T * H),
        )
    return y


class NormRopeFunction(torch.autograd.Function):
    """Fused forward; backward differentiates `norm_rope_reference` (recomputed)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, cos, sin)
        ctx.eps = eps
        return norm_rope_triton(x, weight, eps, cos, sin)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, cos, sin = ctx.saved_tensors
        dx, dw = reference_grads(lambda xg, wg: norm_rope_reference(xg, wg, ctx.eps, cos, sin),
                                 (x, weight), ctx.needs_input_grad[:2], dy)
        return dx, dw, None, None, None


def fused_norm_rope_available(x: Tensor) -> bool:
    """The fused kernel runs on x [T, H, D]: a CUDA fp16/bf16 tensor, power-of-two head dim."""
    D = x.shape[-1]
    return (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and D >= 16 and not (D & (D - 1)))


def qk_norm_rope_kv_available(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None,
                              k_weight: Tensor | None, kc: Tensor, vc: Tensor) -> bool:
    """The one-launch q/k norm + RoPE + KV-cache write serves these tensors: fused norm+RoPE
    shapes, one dtype everywhere (so the cache store is no cast: the unfused path rounds k to
    its own dtype and then casts to the cache's), unit-stride head rows, caches [S, L, Hkv, D]
    with the same strides."""
    dt = q.dtype
    return (fused_norm_rope_available(q) and k.dtype == v.dtype == kc.dtype == vc.dtype == dt
            and all(w is None or w.dtype == dt for w in (q_weight, k_weight))
            and (q_weight is None) == (k_weight is None)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and kc.stride(-1) == 1
            and kc.stride() == vc.stride() and k.shape == v.shape
            and kc.shape[-2:] == k.shape[-2:] and q.shape[-1] == k.shape[-1])


def qk_norm_rope_kv(q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None,
                    k_weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor, kc: Tensor,
                    vc: Tensor, slot: Tensor, pos: Tensor,
                    l2_prefetch: L2Prefetch | None = None) -> Tensor:
    """Attention's pre-read work in one launch (no autograd; CUDA or the interpreter): returns
    norm_rope(q) [T, H, D] and stores norm_rope(k) and v at kc/vc[slot[t], pos[t]]; the same
    bits as `norm_rope_triton` for q and k followed by `kv_write.kv_write`. `l2_prefetch`:
    byte ranges the launch prefetches into L2 first (pdl.L2Prefetch; CUDA sm_90)."""
    _check(q, q_weight, cos, sin)
    _check(k, k_weight, cos, sin)
    T, H, D = q.shape
    hkv = k.shape[1]
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    if T:
        pf_args, pf_consts = l2_prefetch_args(l2_prefetch, T * (H + 2 * hkv), pos)
        _qk_norm_rope_kv_kernel[(T, H + 2 * hkv)](
            q, k, v, q_weight if q_weight is not None else q, k_weight if k_weight is not None else k,
            cos, sin, qo, kc, vc, slot, pos, H, hkv, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), qo.stride(0), qo.stride(1), cos.stride(0),
            kc.stride(0), kc.stride(1), kc.stride(2), eps, *pf_args, D=D,
            HAS_NORM=q_weight is not None, **pf_consts,
            num_warps=1 if D <= 128 else 2, **pdl_launch(q.device, T * (H + 2 * hkv)))
    return qo
