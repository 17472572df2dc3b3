"""Decode GEMV for FP8 block-128 weights (W8A16): `y[M, N] = x[M, K] @ W^T`, M <= 4, fast mode.

Why a kernel of its own: the shared tile GEMV (`gemv._gemv_kernel`) reduces over K with a
`tl.sum` every step and rounds the dequantized tile to the activation dtype first, and at M = 1
on a wide shape it lost to the `tl.dot` loop (H100, 4096x12288: 32.2 vs 26.0 us), so FP8 decode
ran the dot loop: 23.4 us on the H200 = 1.41x cuBLAS BF16 where issue 3 asks 1.6x.

Design, as the nibble-plane kernel's deferred path (docs/kernels.md, session 6):
- Program (pid_n, pid_k) owns BN output rows (BN divides 128: all rows share one scale row) and
  one K-slice. Per BK step it loads the [BN, BK] weight bytes once and multiplies them by x
  already scaled by the step's 128-block scales (`xs[k] = x[k] * s[n_blk, k // 128]`: BK
  multiplies per program instead of BN * BK), into a [BN, MP, BK] fp32 register accumulator
  that is reduced over K once, after the loop (no shuffle tree per step).
- DEC (the e4m3 -> fp32 decode, measured against each other on the device):
  0: Triton's `.to(tl.float32)` (sm_90: cvt e4m3x2 -> f16x2, then f16 -> f32);
  1: integer bits: the byte moved to the top of an int32 and shifted right arithmetically by
     4 puts the sign at bit 31 and the 7 magnitude bits (eeee mmm) at 20..26, i.e. the fp32
     whose value is the e4m3 value * 2^-120 (subnormal codes land on fp32 subnormals, which
     `fma.rn.f32` keeps: Triton emits no .ftz), with bits 27..30 cleared by one AND. The 2^120
     is split between x (2^60 before the products) and the scale (2^60 after), so no
     product or partial sum leaves the normal range. Words are loaded as int32 (4 codes) and
     the 4 byte planes meet x[4j + P] (strided x loads, as the nibble planes).
- XPRE: each step loads the next step's x before its own math (x loads are not pipelined with
  the weight loads otherwise).
Fast mode only: the weights are not rounded to the activation dtype before the multiply, so the
sums differ from the reference's in the last bits. Split-K as `gemv._store_out` (fp32
workspace, last-arriving slice adds the slices in order: deterministic).

Roofline (H200, copy ~4165 GB/s): 4096x12288 FP8 = 50.33 MB + 12 KB scales -> 12.1 us; cuBLAS
BF16 moves 100.7 MB (33 us measured), so the bytes allow 2.7x and issue 3's 1.6x needs
<= ~20.6 us (59% of copy). Instructions per weight element: DEC 1 = 2-3 integer ops + 1 FFMA
(integer ops issue at half the FFMA rate: 50 M elements / 132 SMs at 64 int ops/clk ~ 9 us at
1.9 GHz, under the byte floor); DEC 0 = a convert pair + 1 FFMA, at the convert unit's rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels import gemv
from orbit.kernels._triton import tl, triton
from orbit.kernels.gemv import (
    GEMV_MIN_PROGRAMS_PER_SM,
    _lora_d,
    _program_slice,
    _store_out,
    lora_launch,
    norm_counter,
    num_sms,
    prefetch_first_steps,
    split_k,
    split_k_launch,
)
from orbit.kernels.lora_epilogue import LoRAEpilogue, lora_shrink_role, shrink_program
from orbit.kernels.norm_epilogue import NormEpilogue, norm_kernel_args
from orbit.kernels.pdl import pdl_enter, pdl_launch

FP8_BLOCK = 128
# x * 2^60 before the products, scale * 2^60 after: the DEC 1 bits are the value * 2^-120.
X_UP = tl.constexpr(2.0**60)


@dataclass(frozen=True)
class Fp8GemvConfig:
    """BN output rows (divides 128) x BK reduction per step (a multiple of 128, or a divisor
    when K is short); split K-slices; DEC the e4m3 decode (module doc)."""

    block_n: int = 32
    block_k: int = 256
    split: int = 1
    warps: int = 4
    stages: int = 3
    dec: int = 1
    x_prefetch: bool = True
    pdl: bool = False  # programmatic dependent launch (orbit/kernels/pdl.py), where available
    l2_prefetch: bool = False  # with PDL: first steps' weights into L2 first (gemv.GemvConfig)
    w_preload: int = 0  # with PDL: first 0-2 steps' weights into registers first (same)


@triton.jit
def _x_step(x_ptr, k0, k_hi, stride_xm, M, MP: tl.constexpr, BK: tl.constexpr):
    """x[m, k0:k0+BK] as float32 [MP, BK], zero past k_hi or M."""
    am = tl.arange(0, MP)
    ak = tl.arange(0, BK)
    ok = (am[:, None] < M) & ((k0 + ak) < k_hi)[None, :]
    xv = tl.load(x_ptr + am[:, None] * stride_xm + k0 + ak[None, :], mask=ok, other=0.0)
    return xv.to(tl.float32)


@triton.jit
def _x_byte_planes(x_ptr, k0, k_hi, stride_xm, M, MP: tl.constexpr, BK: tl.constexpr):
    """The 4 byte planes of x[m, k0:k0+BK]: plane P is x[m, k0 + 4j + P] as float32
    [MP, BK/4], zero past k_hi or M."""
    am = tl.arange(0, MP)
    aj = tl.arange(0, BK // 4)
    ptrs = x_ptr + am[:, None] * stride_xm + k0 + (aj * 4)[None, :]
    ok = (am[:, None] < M) & ((k0 + aj * 4) < k_hi)[None, :]
    return (tl.load(ptrs + 0, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 1, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 2, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 3, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _x_next(x_ptr, k0, k_hi, stride_xm, M, MP: tl.constexpr, BK: tl.constexpr,
            PLANES: tl.constexpr):
    if PLANES:
        return _x_byte_planes(x_ptr, k0, k_hi, stride_xm, M, MP, BK)
    else:
        return _x_step(x_ptr, k0, k_hi, stride_xm, M, MP, BK)


@triton.jit
def _e4m3_bits(words, P: tl.constexpr):
    """Byte P of int32 words as the float32 e4m3 value * 2^-120 (module doc, DEC 1)."""
    if P < 3:
        top = words << (24 - 8 * P)
    else:
        top = words
    # >> on int32 is arithmetic; -2014314496 is the int32 0x87F00000 (sign bit + bits 20..26)
    return ((top >> 4) & -2014314496).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_fp8_kernel(x_ptr, out_ptr, q_ptr, s_ptr, y_ptr, cnt_ptr, M, N, K, K_PER, SPLIT,
                     stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym,
                     h_ptr, a0, a1, a2, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm, hc_ptr, LSR,
                     r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
                     MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     STAGES: tl.constexpr, FIXUP: tl.constexpr, DEC: tl.constexpr,
                     XPRE: tl.constexpr, PDL: tl.constexpr = False,
                     L2PRE: tl.constexpr = False, LORA: tl.constexpr = 0,
                     LRP: tl.constexpr = 1, SHRINK: tl.constexpr = False,
                     SBK: tl.constexpr = 16, NORM: tl.constexpr = False,
                     NB: tl.constexpr = 16, WPRE: tl.constexpr = 0):
    # SHRINK: the first PN grid columns are LoRA shrink programs (as in the plane kernel).
    # WPRE (Fp8GemvConfig.w_preload): the first WPRE steps' weights and scales are loaded
    # before the PDL wait (frozen: no hazard with the previous kernel; gemv.GemvConfig).
    PN = 0
    if SHRINK:
        PN = tl.cdiv(LSR, SPLIT)
    pid_n, pid_k, k_lo, k_hi, offs_n, row_ok = _program_slice(K_PER, K, N, BN, PN, SHRINK,
                                                              False, 0)
    if PDL and L2PRE:  # the first steps' weight bytes into L2 before waiting on the last kernel
        prefetch_first_steps(q_ptr, offs_n, row_ok, stride_q, k_lo, k_hi, BK, STAGES,
                             4 if DEC == 1 else 1, BK)
    # (a shrink program's pid_n is negative: clamped, its preloaded scales go unused)
    s_row = s_ptr + ((tl.maximum(pid_n, 0) * BN) // 128) * stride_s
    w0, s0, w1, s1 = 0, 0.0, 0, 0.0
    if WPRE > 0:
        w0, s0 = _fp8_loads(q_ptr, s_row, offs_n, row_ok, stride_q, k_lo, k_hi, BK, DEC)
    if WPRE > 1:
        w1, s1 = _fp8_loads(q_ptr, s_row, offs_n, row_ok, stride_q, k_lo + BK, k_hi, BK, DEC)
    pdl_enter(PDL)
    if shrink_program(PN, SHRINK):
        lora_shrink_role(tl.program_id(0) * SPLIT + pid_k, x_ptr, stride_xm, M, K, a0, a1, a2,
                         h_ptr, stride_hm, hc_ptr, LR, LSR, LORA, MP, SBK)
    else:
        _fp8_main(x_ptr, out_ptr, q_ptr, s_ptr, y_ptr, cnt_ptr, M, N, SPLIT, stride_xm,
                  stride_om, stride_os, stride_q, stride_s, stride_ym, h_ptr, b0, b1, b2, LN0,
                  LN1, LR, lscale, stride_hm, hc_ptr, LSR, pid_n, pid_k, k_lo, k_hi, offs_n,
                  row_ok, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps, MP, BN, BK, STAGES,
                  FIXUP, DEC, XPRE, LORA, LRP, SHRINK, NORM, NB, w0, s0, w1, s1, WPRE)


@triton.jit
def _fp8_loads(q_ptr, s_row, offs_n, row_ok, stride_q, k0, k_hi, BK: tl.constexpr,
               DEC: tl.constexpr):
    """The frozen operands of the step at k0: the weights (DEC 1: int32 words [BN, BK/4];
    else the e4m3 bytes [BN, BK]) and each column's block scale (DEC 1: times X_UP)."""
    WB: tl.constexpr = BK // 4 if DEC == 1 else BK
    aw = tl.arange(0, WB)
    if DEC == 1:
        kk = k0 + aw * 4
        sc = tl.load(s_row + kk // 128, mask=kk < k_hi, other=0.0) * X_UP  # [WB]
        w = tl.load(q_ptr + offs_n[:, None] * stride_q + (k0 // 4 + aw)[None, :],
                    mask=row_ok[:, None] & (kk < k_hi)[None, :], other=0)
    else:
        kk = k0 + aw
        sc = tl.load(s_row + kk // 128, mask=kk < k_hi, other=0.0)  # [BK]
        w = tl.load(q_ptr + offs_n[:, None] * stride_q + kk[None, :],
                    mask=row_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
    return w, sc


@triton.jit
def _fp8_math(w, sc, x_cur, acc, DEC: tl.constexpr):
    """One step's products into acc [BN, MP, WB]."""
    if DEC == 1:
        for p in tl.static_range(4):
            acc += _e4m3_bits(w, p)[:, None, :] * (x_cur[p] * sc[None, :])[None, :, :]
    else:
        acc += w.to(tl.float32)[:, None, :] * (x_cur * sc[None, :])[None, :, :]
    return acc


@triton.jit
def _fp8_main(x_ptr, out_ptr, q_ptr, s_ptr, y_ptr, cnt_ptr, M, N, SPLIT, stride_xm, stride_om,
              stride_os, stride_q, stride_s, stride_ym, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale,
              stride_hm, hc_ptr, LSR, pid_n, pid_k, k_lo, k_hi, offs_n, row_ok, r_ptr, nw_ptr,
              ns_ptr, nx_ptr, ncnt_ptr, NT, eps, MP: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, STAGES: tl.constexpr,
              FIXUP: tl.constexpr, DEC: tl.constexpr, XPRE: tl.constexpr, LORA: tl.constexpr,
              LRP: tl.constexpr, SHRINK: tl.constexpr, NORM: tl.constexpr,
              NB: tl.constexpr, w0, s0, w1, s1, WPRE: tl.constexpr):
    """The column-tile program of _gemv_fp8_kernel (after the PDL wait); the first WPRE
    steps' operands are w0, s0 (and w1, s1), loaded before it."""
    am = tl.arange(0, MP)
    lora_d = _lora_d(offs_n, am, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm,
                     y_ptr.dtype.element_ty, LORA, LRP, SHRINK)
    s_row = s_ptr + ((pid_n * BN) // 128) * stride_s  # BN divides 128: one scale row
    WB: tl.constexpr = BK // 4 if DEC == 1 else BK  # accumulator width: words or bytes
    acc = tl.zeros((BN, MP, WB), dtype=tl.float32)
    if XPRE:
        x_nxt = _x_next(x_ptr, k_lo, k_hi, stride_xm, M, MP, BK, DEC == 1)
    k_start = k_lo
    for j in tl.static_range(WPRE):  # the preloaded steps
        k0 = k_lo + j * BK
        if XPRE:
            x_cur = x_nxt
            x_nxt = _x_next(x_ptr, k0 + BK, k_hi, stride_xm, M, MP, BK, DEC == 1)
        else:
            x_cur = _x_next(x_ptr, k0, k_hi, stride_xm, M, MP, BK, DEC == 1)
        if j == 0:
            acc = _fp8_math(w0, s0, x_cur, acc, DEC)
        else:
            acc = _fp8_math(w1, s1, x_cur, acc, DEC)
        k_start = k0 + BK
    for k0 in tl.range(k_start, k_hi, BK, num_stages=STAGES):
        if XPRE:
            x_cur = x_nxt
            x_nxt = _x_next(x_ptr, k0 + BK, k_hi, stride_xm, M, MP, BK, DEC == 1)
        else:
            x_cur = _x_next(x_ptr, k0, k_hi, stride_xm, M, MP, BK, DEC == 1)
        w, sc = _fp8_loads(q_ptr, s_row, offs_n, row_ok, stride_q, k0, k_hi, BK, DEC)
        acc = _fp8_math(w, sc, x_cur, acc, DEC)
    out = tl.sum(acc, axis=2)  # [BN, MP]
    if DEC == 1:
        out = out * X_UP
    _store_out(out, out_ptr, y_ptr, cnt_ptr, pid_n, pid_k, SPLIT, M, N, offs_n, am,
               stride_om, stride_os, stride_ym, FIXUP, lora_d, h_ptr, b0, b1, b2, LN0, LN1, LR,
               lscale, stride_hm, hc_ptr, LSR, LORA, LRP, SHRINK, False, 0, False, r_ptr,
               nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps, NORM, NB)


# M = 1 without split-K, as the INT4 plane GEMV (gemv.PLANES_M1_UNSPLIT, which measured +6%
# in the H100 batch-1 engine): FP8_BLOCK_N_M1_UNSPLIT-row tiles where 32-row ones leave the SMs
# under-filled. Off until measured for FP8 (bench_engine.py --sections formats --formats fp8
# --knob orbit.kernels.gemv_fp8.FP8_M1_UNSPLIT=False,True).
FP8_M1_UNSPLIT = False
FP8_BLOCK_N_M1_UNSPLIT = 16  # (divides FP8_BLOCK, as every FP8 tile must)


def pick_fp8_gemv_config(m: int, n: int, k: int, sms: int) -> Fp8GemvConfig:
    """Defaults, with K split when the row tiles alone leave the SMs under-filled (the rule of
    gemv.pick_gemv_config: about 4 programs per SM, each slice at least 2 steps deep); at
    M = 1 with FP8_M1_UNSPLIT, narrower unsplit tiles instead."""
    cfg = Fp8GemvConfig()
    n_tiles = triton.cdiv(n, cfg.block_n)
    # 256-deep steps on wide shapes (4096x12288: 22.7 vs 25.8 us at 128), 128 where K is split
    # (2048x6144: 10.5 vs 11.3 us; H200, session 8).
    wide = n_tiles >= GEMV_MIN_PROGRAMS_PER_SM * sms
    unsplit = m == 1 and FP8_M1_UNSPLIT and not wide
    block_n = FP8_BLOCK_N_M1_UNSPLIT if unsplit else cfg.block_n
    block_k = cfg.block_k if ((wide or unsplit) and k >= 4 * cfg.block_k) else FP8_BLOCK
    split = 1 if unsplit else split_k(n_tiles, triton.cdiv(k, block_k), sms)
    return Fp8GemvConfig(block_n=block_n, block_k=block_k, split=split,
                         l2_prefetch=gemv.PDL_L2_PREFETCH, w_preload=gemv.PDL_W_PRELOAD)


def gemv_fp8(x: Tensor, q: Tensor, s: Tensor, y: Tensor,
             config: Fp8GemvConfig | None = None, lora: LoRAEpilogue | None = None,
             norm: NormEpilogue | None = None) -> Tensor:
    """y[M, N] = x[M, K] @ dequant(q, s)^T for q float8_e4m3fn [N, K], s float32 block scales
    [ceil(N/128), ceil(K/128)], 1 <= M <= 4 (already validated by `_qgemm.launch`); `lora`
    adds a LoRA delta in the store (orbit/kernels/lora_epilogue.py); `norm` the residual add +
    RMSNorm after it (orbit/kernels/norm_epilogue.py)."""
    n, k = q.shape
    m = x.shape[0]
    assert 1 <= m <= 4 and q.dtype == torch.float8_e4m3fn, (m, q.dtype)
    cfg = config or pick_fp8_gemv_config(m, n, k, num_sms(x.device))
    if FP8_BLOCK % cfg.block_n or (cfg.block_k % FP8_BLOCK and FP8_BLOCK % cfg.block_k):
        raise ValueError(f"FP8 GEMV tile {cfg.block_n}x{cfg.block_k}: block_n must divide 128 "
                         "and block_k be a multiple or a divisor of 128")
    dec = cfg.dec
    if dec == 1 and (k % 4 or q.stride(0) % 4 or q.storage_offset() % 4 or q.stride(1) != 1):
        dec = 0  # the int32 word view needs 4-byte-aligned rows
    qv = q.view(torch.int32) if dec == 1 else q
    grid, k_per, split, out, stride_om, stride_os, cnt, fixup = split_k_launch(
        x, y, n, k, cfg.block_n, cfg.block_k, cfg.split)
    cnt = cnt if cnt is not None else s
    nargs, nconst = norm_kernel_args(norm, y, grid[0], norm_counter(x.device) if norm else cnt)
    pdl = pdl_launch(x.device, grid[0] * grid[1], forced=cfg.pdl)
    largs, lconst, grid = lora_launch(lora, x, y, grid, split, in_kernel=True)
    _gemv_fp8_kernel[grid](
        x, out, qv, s, y, cnt, m, n, k, k_per, split, x.stride(0), stride_om, stride_os,
        qv.stride(0), s.stride(0), y.stride(0), *largs, *nargs, MP=triton.next_power_of_2(m),
        BN=cfg.block_n, BK=cfg.block_k, STAGES=cfg.stages, FIXUP=fixup, DEC=dec,
        XPRE=cfg.x_prefetch, L2PRE=cfg.l2_prefetch, WPRE=cfg.w_preload, num_warps=cfg.warps,
        **lconst, **nconst, **pdl)
    return y
