"""LoRA at decode in two launches per sibling group: shrink `h = x A^T`, then expand-add
`y += scale * h B^T` in place (forward only, fast mode).

The plain LoRA forward (orbit/adapters/lora.py) is four launches per adapted linear: `x @ A^T`,
`h @ B^T`, the scale multiply and the add into the base output. In a batch-1 decode step of a
28-layer model with LoRA on all 7 linears that is 784 launches of ~1-3 us for a few KB each:
more than the whole base model's step (docs/benchmarks.md, "Session 9"). Here the members of
a sibling group (q/k/v, gate/up: they read one input, orbit.quant.siblings) share both
launches: the shrink computes every member's [M, r] block of h, the expand walks the members'
output columns one after another. Per layer that is 8 launches (q/k/v, o, gate/up, down)
instead of 28.

Arithmetic, so the fused path gives the unfused forward's numbers up to summation order: h is
rounded to the activation dtype (what `x @ A^T` returns), the expand's sum is rounded to it
(`h @ B^T`), multiplied by the scale in float32 and rounded (`scale * t`), and added to y in
float32 and rounded (`y + t`). cuBLAS may sum in another order, so a value can differ in its
last bit; exact mode never takes this path (its LoRA runs batch-invariant matmuls).

Shapes: x [M, K]; member s has A_s [r, K], B_s [N_s, r] (contiguous rows, the adapter's slot
tensors) and an output y_s [M, N_s] (any row stride, unit column stride: a column slice of
the sibling group's GEMV output). At most MAX_MEMBERS members, any M >= 1 (both kernels walk
row blocks: SHRINK_BM rows per shrink program, EXPAND_BM per expand program).

Where the base launch can take it, the engine skips both launches: the base launch computes
h in its own first programs and adds the delta in its store (orbit/kernels/lora_epilogue.py,
which reuses `_shrink_block` and `_member` from here).

Roofline (docs/kernels.md, "LoRA decode kernels"): 0.03-0.94 us of bytes per group call at
4.17 TB/s, far under a launch's fixed latency: the design minimises launches, not bytes.

Launch shapes (explicit, no autotuning), from scripts/bench/bench_lora_decode.py (H200):
- below DOT_MIN_M rows the shrink runs one program per (member, row of A) over all of K
  (48 programs for q/k/v at r 16, one or two steps each) with fp32 broadcast products;
- from DOT_MIN_M rows on, one program per (member, SHRINK_KC chunk of K) computes all r rows
  with a tensor-core `tl.dot` (x padded to 16 rows), and the last chunk program of each
  member to arrive adds the fp32 partials in chunk order (deterministic);
- the expand-add runs one program per EXPAND_BN output columns (fewer with broadcast
  products), EXPAND_BM rows (a grid row per block of them), `tl.dot` from DOT_MIN_M rows on.
Measured and dropped: the shrink and the expand in one launch (each expand program computing
its member's h from x and A itself) was 2-4x slower than the two launches at M = 1 (down:
19.2 vs 4.3 us): every program re-reads all of A_s serially before its first output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.pdl import pdl_enter, pdl_launch

MAX_MEMBERS = 3
SHRINK_BM = 64  # rows per shrink program (row blocks beyond)
EXPAND_BM = 64  # rows per expand-add program (row blocks beyond: rollout batches, prefill)
ELEMS = 4096  # broadcast-product elements per program step (32 per thread on 4 warps)
WARPS = 4
SHRINK_KC = 256  # K chunk per shrink program (split-K over chunks, fix-up by the last one)
DOT_MIN_M = 8  # from this many rows (power of two) the products run as tl.dot
DOT_BK = 64  # K step of the shrink's tl.dot
EXPAND_BN = 128  # output columns per expand program (fewer for wide broadcast products)


@triton.jit
def _member(s, p0, p1, p2, S: tl.constexpr):
    """Member s's pointer among p0..p2 (S members; unused ones are never selected)."""
    p = p0
    if S > 1:
        if s == 1:
            p = p1
    if S > 2:
        if s == 2:
            p = p2
    return p


@triton.jit
def _shrink_block(x_ptr, a_ptr, offs_m, m_ok, offs_j, j_ok, k_lo, k_hi, K, stride_xm,
                  BM: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
                  STAGES: tl.constexpr):
    """fp32 [BM, RP] = x[offs_m, k_lo:k_hi] @ A[offs_j, k_lo:k_hi]^T (A rows K long), its
    loop software-pipelined STAGES deep (1: not; inside another kernel, whose registers it
    would otherwise take: lora_epilogue's shrink programs)."""
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        kk = k0 + tl.arange(0, BK)
        k_ok = kk < k_hi
        xm = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        a = tl.load(a_ptr + offs_j[:, None] * K + kk[None, :],
                    mask=j_ok[:, None] & k_ok[None, :], other=0.0)  # [RP, BK]
        if DOT:
            acc = tl.dot(xm, tl.trans(a), acc)
        else:
            acc += tl.sum(xm.to(tl.float32)[:, None, :] * a.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _lora_shrink_kernel(x_ptr, a0, a1, a2, ws_ptr, h_ptr, cnt_ptr, M, K, R, KC, SPLIT,
                        stride_xm, stride_hm, S: tl.constexpr, BM: tl.constexpr,
                        JB: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr,
                        PDL: tl.constexpr = False):
    # h[m, s*R + j] = round(sum_k x[m, k] * A_s[j, k]). Program ((s * NJ + jb) * SPLIT + c,
    # mb) sums K chunk c of rows jb*JB.. of member s for rows mb*BM.. of x; with SPLIT > 1 it
    # stores an fp32 partial and the last chunk program of (s, jb, mb) to arrive adds the SPLIT
    # partials in chunk order (deterministic) and rounds (the split-K fix-up of
    # orbit/kernels/gemv.py).
    pdl_enter(PDL)
    pid = tl.program_id(0)
    mb = tl.program_id(1)
    nj = tl.cdiv(R, JB)
    c = pid % SPLIT
    sj = pid // SPLIT
    s = sj // nj
    a_ptr = _member(s, a0, a1, a2, S)
    offs_m = mb * BM + tl.arange(0, BM)
    offs_j = (sj % nj) * JB + tl.arange(0, JB)
    m_ok = offs_m < M
    j_ok = offs_j < R
    k_lo = c * KC
    acc = _shrink_block(x_ptr, a_ptr, offs_m, m_ok, offs_j, j_ok, k_lo,
                        tl.minimum(k_lo + KC, K), K, stride_xm, BM, JB, BK, DOT, 3)
    ok = m_ok[:, None] & j_ok[None, :]
    cols = s * R + offs_j[None, :]
    hp = h_ptr + offs_m[:, None] * stride_hm + cols
    if SPLIT == 1:
        tl.store(hp, acc.to(h_ptr.dtype.element_ty), mask=ok)
    else:
        n_cols = S * R
        wp = ws_ptr + offs_m[:, None] * n_cols + cols
        tl.store(wp + c * M * n_cols, acc, mask=ok)
        tl.debug_barrier()
        ci = mb * (S * nj) + sj  # this (row block, member, A-row block)'s counter
        arrived = tl.atomic_add(cnt_ptr + ci, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BM, JB), dtype=tl.float32)
            for c2 in range(SPLIT):
                total += tl.load(wp + c2 * M * n_cols, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(hp, total.to(h_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(cnt_ptr + ci, 0, sem="relaxed")


@triton.jit
def _lora_expand_add_kernel(h_ptr, b0, b1, b2, y0, y1, y2, M, N0, N1, N2, R, scale, stride_hm,
                            sy0, sy1, sy2, S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            RP: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr = False):
    # y_s[m, n] = round(y_s[m, n] + round(scale * round(sum_j h[m, s*R + j] * B_s[n, j])));
    # program (tile, row block) = one BN-column tile of BM rows, the members' tiles one after
    # another along axis 0.
    pdl_enter(PDL)
    pid = tl.program_id(0)
    mb = tl.program_id(1)
    t0 = tl.cdiv(N0, BN)
    t1 = tl.cdiv(N1, BN)
    s = 0
    tile = pid
    if S > 1:
        if pid >= t0:
            s = 1
            tile = pid - t0
    if S > 2:
        if pid >= t0 + t1:
            s = 2
            tile = pid - t0 - t1
    b_ptr = _member(s, b0, b1, b2, S)
    y_ptr = _member(s, y0, y1, y2, S)
    n = _member(s, N0, N1, N2, S)
    sy = _member(s, sy0, sy1, sy2, S)
    offs_m = mb * BM + tl.arange(0, BM)
    offs_n = tile * BN + tl.arange(0, BN)
    offs_j = tl.arange(0, RP)
    m_ok = offs_m < M
    n_ok = offs_n < n
    j_ok = offs_j < R
    dt = y_ptr.dtype.element_ty
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + s * R + offs_j[None, :],
                mask=m_ok[:, None] & j_ok[None, :], other=0.0)  # [BM, RP]
    b = tl.load(b_ptr + offs_n[:, None] * R + offs_j[None, :],
                mask=n_ok[:, None] & j_ok[None, :], other=0.0)  # [BN, RP]
    if DOT:
        d = tl.dot(h, tl.trans(b))  # [BM, BN] fp32
    else:
        d = tl.sum(h.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
    d = (d.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)
    yp = y_ptr + offs_m[:, None] * sy + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(yp, mask=ok, other=0.0).to(tl.float32)
    tl.store(yp, (y + d).to(dt), mask=ok)


def lora_decode_reference(x: Tensor, a: list[Tensor], b: list[Tensor], y: list[Tensor],
                          scale: float) -> list[Tensor]:
    """The unfused LoRA forward of each member (orbit/adapters/lora.py), out of place."""
    return [yi + (scale * ((x.to(ai.dtype) @ ai.T) @ bi.T)).to(yi.dtype)
            for ai, bi, yi in zip(a, b, y)]


def check_members(x: Tensor, a: list[Tensor], b: list[Tensor], y: list[Tensor]) -> None:
    """Raise ValueError naming the first tensor that the kernels cannot take."""
    if not 1 <= len(a) <= MAX_MEMBERS or not len(a) == len(b) == len(y):
        raise ValueError(f"lora_decode: 1..{MAX_MEMBERS} members with one A, B and y each; got "
                         f"{len(a)} A, {len(b)} B, {len(y)} y")
    if x.dim() != 2 or x.stride(-1) != 1 or x.shape[0] < 1:
        raise ValueError(f"lora_decode: x must be [M, K] with unit column stride and M >= 1; "
                         f"got shape {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    r = a[0].shape[0]
    for i, (ai, bi, yi) in enumerate(zip(a, b, y)):
        if ai.shape != (r, k) or not ai.is_contiguous() or ai.dtype != x.dtype:
            raise ValueError(f"lora_decode: A[{i}] must be contiguous [{r}, {k}] {x.dtype}; got "
                             f"{tuple(ai.shape)} {ai.dtype}")
        if bi.dim() != 2 or bi.shape[1] != r or not bi.is_contiguous() or bi.dtype != x.dtype:
            raise ValueError(f"lora_decode: B[{i}] must be contiguous [N, {r}] {x.dtype}; got "
                             f"{tuple(bi.shape)} {bi.dtype}")
        if yi.shape != (m, bi.shape[0]) or yi.stride(-1) != 1 or yi.dtype != x.dtype:
            raise ValueError(f"lora_decode: y[{i}] must be [{m}, {bi.shape[0]}] {x.dtype} with "
                             f"unit column stride; got {tuple(yi.shape)} {yi.dtype} "
                             f"strides {yi.stride()}")


def _pad3(ts: list) -> list:
    return [*ts, *[ts[0]] * (MAX_MEMBERS - len(ts))]


def lora_decode_triton(x: Tensor, a: list[Tensor], b: list[Tensor], y: list[Tensor],
                       scale: float) -> None:
    """Add each member's `scale * (x A_s^T) B_s^T` to y_s in place: a shrink launch, then an
    expand-add launch."""
    check_members(x, a, b, y)
    lora_expand_add(lora_shrink(x, a), b, y, scale)


def lora_shrink(x: Tensor, a: list[Tensor], out: Tensor | None = None) -> Tensor:
    """h [M, S*r] = the members' x A_s^T side by side, in x's dtype (one launch; into `out`,
    unit column stride, where given). The base launches' LoRA epilogue
    (orbit/kernels/lora_epilogue.py) and `lora_expand_add` read it."""
    if not HAS_TRITON:
        raise RuntimeError("lora_shrink needs Triton")
    from orbit.kernels.gemv import arrival_counters  # (gemv imports pdl, as this module does)

    m, k = x.shape
    r, s = a[0].shape[0], len(a)
    mp = triton.next_power_of_2(m)
    dot = _use_dot(x, mp)
    # (up to SHRINK_BM rows per program: more rows, more row blocks)
    bm, rp = min(_rows(mp, dot), SHRINK_BM), _rank_pad(r, dot)
    if dot:  # all rows of A per program, K split in SHRINK_KC chunks (fix-up)
        jb, bk, kc = rp, DOT_BK, SHRINK_KC
    else:  # one row of A per program over all of K: s * r programs, no fix-up
        jb, kc = 1, k
        bk = max(16, min(triton.next_power_of_2(k), ELEMS // bm))
    split = triton.cdiv(k, kc)
    nj = triton.cdiv(r, jb)
    h = out if out is not None else torch.empty((m, s * r), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, m, s * r), dtype=torch.float32, device=x.device) if split > 1 else h
    mblocks = triton.cdiv(m, bm)
    cnt = arrival_counters(x.device, s * nj * mblocks) if split > 1 else h
    grid = (s * nj * split, mblocks)
    _lora_shrink_kernel[grid](x, *_pad3(a), ws, h, cnt, m, k, r, kc, split, x.stride(0),
                              h.stride(0), S=s, BM=bm, JB=jb, BK=bk, DOT=dot, num_warps=WARPS,
                              **pdl_launch(x.device, grid[0] * grid[1]))
    return h


def lora_expand_add(h: Tensor, b: list[Tensor], y: list[Tensor], scale: float) -> None:
    """y_s += scale * h_s B_s^T in place, every member in one launch (h from `lora_shrink`)."""
    m = h.shape[0]
    r, s = b[0].shape[1], len(b)
    mp = triton.next_power_of_2(m)
    dot = _use_dot(h, mp)
    bm, rp = min(_rows(mp, dot), EXPAND_BM), _rank_pad(r, dot)
    bn = EXPAND_BN if dot else max(16, min(EXPAND_BN, ELEMS // (bm * rp)))
    ns = [bi.shape[0] for bi in b]
    grid = (sum(triton.cdiv(n, bn) for n in ns), triton.cdiv(m, bm))
    _lora_expand_add_kernel[grid](h, *_pad3(b), *_pad3(y), m, *_pad3(ns), r, float(scale),
                                  h.stride(0), *_pad3([yi.stride(0) for yi in y]), S=s, BM=bm,
                                  BN=bn, RP=rp, DOT=dot, num_warps=WARPS,
                                  **pdl_launch(h.device, grid[0] * grid[1]))


def _use_dot(x: Tensor, mp: int) -> bool:
    """Tensor-core dots from DOT_MIN_M rows on (padded to 16); below, fp32 broadcast products."""
    return x.dtype in (torch.bfloat16, torch.float16) and mp >= DOT_MIN_M


def _rows(mp: int, dot: bool) -> int:
    return max(16, mp) if dot else mp


def _rank_pad(r: int, dot: bool) -> int:
    return max(16, triton.next_power_of_2(r)) if dot else triton.next_power_of_2(r)
