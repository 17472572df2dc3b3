"""Block-diagonal rotation of activations for OFT: x_rot = x @ blockdiag(R_0, ..., R_{n-1}).

OFTv2 rotates the *input* of every wrapped linear, so this op runs once per adapted linear
per forward: it must stay a memory-bound pass over x (read once, write once), never a dense
[in, in] matmul. The Triton kernel tiles [BLOCK_M rows x one b-block] and multiplies by that
block's b x b matrix with fp32 accumulation; the torch reference is an einsum over the
[..., n, b] view. R stays float32: for 16-bit x the kernel splits it into hi + lo halves in
x's dtype (two tensor-core dots), since a bf16-rounded R is off-orthogonal by ~4e-3.
Backward: dx = dy @ blockdiag(R^T) (same kernel on the transposed blocks), dR[j] = x_j^T dy_j
(a batched GEMM in torch).

Inference (the rollout engine's decode steps): `split_rotation` makes the hi + lo halves once
per adapter version (OFTLinear caches them) and `oft_rotate_frozen` is then one launch per
linear, with programmatic dependent launch inside the engine's `pdl_scope`. Splitting R at
every call costs four elementwise launches per linear, and a launch without PDL cuts the
programmatic edges of the GEMVs around it (orbit/kernels/pdl.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels.pdl import pdl_enter, pdl_launch

try:  # Triton is optional: without it (CPU wheels) the reference runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

MAX_TRITON_BLOCK = 128
# Launch inside the engine's pdl_scope with programmatic dependent launch (False: plain
# launches everywhere, a benchmark's same-run baseline).
USE_PDL = True


def _check(x: Tensor, rot: Tensor) -> tuple[int, int, int]:
    """Returns (n_blocks, b, n_rot); n_rot is 1 for a shared block."""
    if rot.dim() != 3 or rot.shape[1] != rot.shape[2]:
        raise ValueError(f"OFT rotation must be [n, b, b], got {tuple(rot.shape)}")
    n_rot, b, _ = rot.shape
    if x.shape[-1] % b:
        raise ValueError(f"OFT input dim {x.shape[-1]} is not a multiple of block size {b}")
    n = x.shape[-1] // b
    if n_rot not in (1, n):
        raise ValueError(f"OFT rotation has {n_rot} blocks, input needs {n} (or 1 shared)")
    return n, b, n_rot


def oft_rotate_reference(x: Tensor, rot: Tensor) -> Tensor:
    """x [..., n*b], rot [n or 1, b, b] -> [..., n*b] in x.dtype, computed in float32 (or
    float64 for float64 inputs)."""
    n, b, n_rot = _check(x, rot)
    ct = torch.promote_types(torch.promote_types(x.dtype, rot.dtype), torch.float32)
    rot = rot.to(ct)
    if n_rot == 1:
        rot = rot.expand(n, b, b)
    xb = x.to(ct).reshape(*x.shape[:-1], n, b)  # [..., n, b]
    return torch.einsum("...rk,rkc->...rc", xb, rot).reshape(x.shape).to(x.dtype)


if triton is not None:

    @triton.jit
    def _oft_rotate_kernel(
        x_ptr, rhi_ptr, rlo_ptr, y_ptr, M, stride_xm, stride_ym, n_in, stride_yg,
        B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
        SHARED: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        # Grid axis 1 walks the blocks of every member rotation (a group of OFT linears that
        # read one x: member g = blk // n_in, writing y[g]); one rotation is the group of one.
        pdl_enter(PDL)
        pid_m = tl.program_id(0)
        blk = tl.program_id(1)
        g = blk // n_in
        jb = blk - g * n_in
        # int64 rows: M * stride can pass 2^31 for long packed batches at MLP widths
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_B)
        kmask = offs_k < B
        mmask = offs_m < M
        cols = jb * B + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        r_offs = offs_k[:, None] * B + offs_k[None, :]
        if SHARED:  # one block per member
            r_offs += g * B * B
        else:
            r_offs += blk * B * B
        r_mask = kmask[:, None] & kmask[None, :]
        r_hi = tl.load(rhi_ptr + r_offs, mask=r_mask, other=0.0)
        if UPCAST:
            # The interpreter's dot mishandles bf16; fp32 products of 16-bit inputs are exact,
            # so this computes the same sums.
            x = x.to(tl.float32)
            r_hi = r_hi.to(tl.float32)
        if IEEE:
            acc = tl.dot(x, r_hi, input_precision="ieee")
        else:
            acc = tl.dot(x, r_hi)
        if SPLIT:
            r_lo = tl.load(rlo_ptr + r_offs, mask=r_mask, other=0.0)
            if UPCAST:
                r_lo = r_lo.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, r_lo, input_precision="ieee")
            else:
                acc += tl.dot(x, r_lo)
        tl.store(y_ptr + g.to(tl.int64) * stride_yg + offs_m[:, None] * stride_ym + cols[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & kmask[None, :])


@dataclass(frozen=True)
class SplitRotation:
    """R [n or 1, b, b] as the kernel takes it for x of `dtype`: `hi` + `lo` in a 16-bit
    dtype (R to ~16 mantissa bits on the tensor cores: a bf16-rounded R is off-orthogonal by
    ~4e-3), or hi = lo = R in float32 (one dot); `rot` is R in float32 (the reference's)."""

    rot: Tensor
    hi: Tensor
    lo: Tensor
    dtype: torch.dtype


def split_rotation(rot: Tensor, dtype: torch.dtype) -> SplitRotation:
    """`rot` [n or 1, b, b] (any float dtype) ready for x of `dtype` (no autograd)."""
    rot = rot.detach().float().contiguous()
    if dtype == torch.float32:
        return SplitRotation(rot, rot, rot, dtype)
    hi = rot.to(dtype)
    return SplitRotation(rot, hi, (rot - hi.float()).to(dtype), dtype)


def concat_splits(splits: list[SplitRotation]) -> SplitRotation:
    """The rotations of a group of OFT linears that read one input (equal block size, all
    shared or none, one dtype), stacked member after member: what `oft_rotate_group_frozen`
    takes. (Made once per adapter version by the caller: a cat is a launch.)"""
    shapes = {(tuple(s.rot.shape[1:]), s.rot.shape[0] == 1, s.dtype) for s in splits}
    if len(shapes) != 1:
        raise ValueError(f"oft_rotate: a group needs one block size, sharing and dtype, got "
                         f"{sorted(map(str, shapes))}")
    return SplitRotation(*(torch.cat([getattr(s, f) for s in splits]) for f in ("rot", "hi", "lo")),
                         splits[0].dtype)


def _launch(x2d: Tensor, rot: Tensor | SplitRotation, out: Tensor | None = None,
            members: int = 1) -> Tensor:
    """x2d [M, n*b] with unit column stride, rot [n or 1, b, b] (any float dtype) or its
    `split_rotation` for x2d's dtype; writes `out` (same shape/dtype as x2d, unit column
    stride) when given. `members` > 1: rot is `concat_splits` of that many rotations (each
    [n or 1, b, b]) and the result [members, M, n*b] holds x rotated by each."""
    sr = rot if isinstance(rot, SplitRotation) else split_rotation(rot, x2d.dtype)
    if sr.dtype != x2d.dtype:
        raise ValueError(f"oft_rotate: rotation split for {sr.dtype}, x is {x2d.dtype}")
    if sr.rot.shape[0] % members:
        raise ValueError(f"oft_rotate: {sr.rot.shape[0]} blocks are not {members} rotations")
    member_rot = sr.rot[: sr.rot.shape[0] // members]
    n, b, n_rot = _check(x2d, member_rot)
    assert x2d.dim() == 2 and x2d.stride(1) == 1, (x2d.shape, x2d.stride())
    split = x2d.dtype != torch.float32
    upcast = os.environ.get("TRITON_INTERPRET", "0") == "1"
    M = x2d.shape[0]
    shape = tuple(x2d.shape) if members == 1 else (members, *x2d.shape)
    if out is None:
        y = torch.empty(shape, dtype=x2d.dtype, device=x2d.device)
    else:
        assert (tuple(out.shape) == shape and out.dtype == x2d.dtype and out.stride(-1) == 1
                and (members == 1 or out.is_contiguous())), (out.shape, out.dtype, out.stride())
        y = out
    block_b = max(16, triton.next_power_of_2(b))
    block_m = 64 if block_b <= 64 else 32
    grid = (triton.cdiv(M, block_m), n * members)
    pdl = pdl_launch(x2d.device, grid[0] * grid[1]) if USE_PDL else {}
    _oft_rotate_kernel[grid](
        x2d, sr.hi, sr.lo, y, M, x2d.stride(0), y.stride(-2), n, M * n * b,
        B=b, BLOCK_B=block_b, BLOCK_M=block_m, SHARED=(n_rot == 1), SPLIT=split,
        UPCAST=upcast, IEEE=upcast or not split, **pdl,
    )
    return y


def oft_rotate_triton(x: Tensor, rot: Tensor | SplitRotation,
                      out: Tensor | None = None) -> Tensor:
    """Forward-only Triton path (no autograd); same contract as the reference (`rot` may be
    its `split_rotation`). `out` (2-D [M, n*b]) lets tests poison the destination first."""
    if triton is None:
        raise RuntimeError("oft_rotate_triton needs triton")
    _check(x, rot.rot if isinstance(rot, SplitRotation) else rot)
    x2d = x.reshape(-1, x.shape[-1])  # [M, n*b]
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return _launch(x2d, rot, out).reshape(x.shape)


class _OFTRotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rot: Tensor) -> Tensor:
        ctx.save_for_backward(x, rot)
        return oft_rotate_triton(x, rot)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, rot = ctx.saved_tensors
        dx = drot = None
        if ctx.needs_input_grad[0]:
            dx = oft_rotate_triton(dy, rot.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            n_rot, b, _ = rot.shape
            n = x.shape[-1] // b
            xb = x.reshape(-1, n, b).float()  # [M, n, b]
            db = dy.reshape(-1, n, b).float()  # [M, n, b]
            drot = torch.einsum("mrk,mrc->rkc", xb, db)  # [n, b, b]
            if n_rot == 1:
                drot = drot.sum(0, keepdim=True)
            drot = drot.to(rot.dtype)
        return dx, drot


def triton_usable(x: Tensor, rot: Tensor) -> bool:
    return (
        triton is not None
        and x.is_cuda
        and rot.shape[-1] <= MAX_TRITON_BLOCK
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def oft_rotate_group_triton(x: Tensor, sr: SplitRotation, members: int) -> Tensor:
    """x [..., n*b] rotated by each of `members` rotations (`concat_splits`), one launch:
    [members, ..., n*b], member g's slice bit for bit `oft_rotate_triton(x, split g)`."""
    if triton is None:
        raise RuntimeError("oft_rotate_group_triton needs triton")
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return _launch(x2d, sr, members=members).reshape(members, *x.shape)


def oft_rotate_group_frozen(x: Tensor, sr: SplitRotation, members: int) -> Tensor:
    """x rotated by each member of a `concat_splits` group (no autograd), [members, ..., n*b]:
    one kernel launch where `oft_rotate_frozen` would take the kernel, else the reference per
    member."""
    if triton_usable(x, sr.rot):
        return oft_rotate_group_triton(x, sr, members)
    return torch.stack([oft_rotate_reference(x, r) for r in sr.rot.chunk(members)])


def oft_rotate_frozen(x: Tensor, sr: SplitRotation) -> Tensor:
    """x [..., n*b] @ blockdiag(R) for a `split_rotation` of x's dtype, no autograd (the
    engine's decode steps): the Triton kernel where `oft_rotate` would take it (one launch),
    else the reference."""
    if triton_usable(x, sr.rot):
        return oft_rotate_triton(x, sr)
    return oft_rotate_reference(x, sr.rot)


def oft_rotate(x: Tensor, rot: Tensor) -> Tensor:
    """x [..., n*b] @ blockdiag(rot) -> [..., n*b] in x.dtype; differentiable in x and rot.

    The Triton kernel on CUDA for blocks up to 128, the reference otherwise.
    """
    if triton_usable(x, rot):
        return _OFTRotate.apply(x, rot)
    return oft_rotate_reference(x, rot)
