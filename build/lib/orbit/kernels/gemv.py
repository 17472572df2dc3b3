"""Decode GEMV / split-K for weight-only formats: `y[M, N] = x[M, K] @ W^T` with M <= 16.

Fast mode only (`_qgemm.launch` calls `gemv` when `not exact and m <= GEMV_MAX_M`); exact mode
keeps the one fixed-config `tl.dot` kernel, so batch invariance is untouched. Forward only.

Design (the classic GEMV): program (pid_n, pid_k) owns BLOCK_N output columns and one K-slice.
Per BLOCK_K step it dequantizes the packed weight tile [BLOCK_N, BLOCK_K] with the same tile
loader as the fused GEMM (`_qgemm._w_tile`: float32, bit for bit `qweight.dequantize`), rounds
it to the activation dtype (the reference multiplies those BF16/FP16 weights) and, for each of
the MP = next_pow2(M) rows (a constexpr-unrolled loop), multiplies it by that x row broadcast
over the tile and reduces over K with `tl.sum` in fp32. No `tl.dot`: M=1 no longer pads to a
16-row MMA, and the dequantized tile never goes through shared memory.
4-bit formats (int4, nvfp4, mxfp4) run `_gemv_planes_kernel` instead, which never builds the
dequantized tile: it multiplies each of the 8 nibble planes of the packed words by the x
elements they meet and scales each group's sum once (docs/kernels.md, "Nibble-plane GEMV";
H100: int4 4096x12288 at M=1 21.3 us vs 37.3 for the tile kernel). At M = 1 it defers the
reduction to after the K loop, decodes int4 nibbles in place and prefetches the next step's x
(GemvConfig.defer / x_prefetch; docs/kernels.md, session 6; H200: 14.0 us vs 20.8).
Split-K (SPLIT > 1) when N / BLOCK_N programs would not fill the SMs: each slice writes its
fp32 partial sums to a workspace [SPLIT, M, N]; the last slice program of each column tile to
finish (an arrival counter, `_store_out`) adds the slices in slice order and casts
(deterministic: the order does not depend on which program arrives last). GemvConfig(fixup=
False) keeps the older second launch (`_splitk_reduce_kernel`) for same-run comparison. INT4 at
M = 1 is not split (narrower tiles instead, PLANES_M1_UNSPLIT: the fix-up's round trip cost
more than the fuller grid gained). Configs come from `pick_gemv_config`, an
explicit heuristic (no autotuning) whose constants below are meant to be swept on the device.

Roofline (before the first GPU run; copy bandwidth measured 2990 GB/s on the lent H100):
bytes = packed weight + scales (+ offsets, + x + y, tiny at decode), t_min = bytes / 2990 GB/s.
4096 x 12288 (in x out), M = 1:
  INT4 g128: 4096*12288/2 = 25.17 MB codes + 12288*32*2 = 0.79 MB bf16 scales + 0.03 MB x/y
             = 25.99 MB -> 8.7 us (BF16: 100.7 MB -> 33.7 us, so at most 3.9x; the 2.5x goal
             is 13.5 us = 64% of copy bandwidth)
  FP8:       50.33 MB + 0.01 MB scales -> 16.8 us (at most 2.0x; 1.6x goal = 80% of copy)
  NVFP4:     25.17 MB + 3.15 MB e4m3 scales -> 9.5 us (at most 3.6x; 1.6x goal = 45%)
Arithmetic: one fp32 FMA per weight element and row, M*N*K in all, on CUDA cores (~33.5 T
FMA/s on the H100 SXM, datasheet): M=1 0.05 G FMA -> 1.5 us; M=16 0.8 G FMA -> 24 us, over the
INT4 byte floor from M ~ 6 on. The dequantization costs a fixed number of integer/convert
instructions per weight element whatever M is (~5-10 for INT4: 50 M elements at ~30 T simple
ops/s is several us), so it, not bytes, may bound INT4/FP4 even at M = 1: measure before
tuning. GEMV_MAX_M in `_qgemm` caps the rows sent here; lower it if the `tl.dot` kernel wins
at M = 8..16.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from orbit.kernels._qgemm import DEFAULT_UNPACK, FMT_IDS, _w_tile
from orbit.kernels._triton import tl, triton
from orbit.kernels.fp4 import e2m1_scaled, e8m0_scale
from orbit.kernels.int4 import int4_codes
from orbit.kernels.lora_epilogue import (
    LoRAEpilogue,
    kernel_args,
    lora_add,
    lora_await_delta,
    lora_delta,
    lora_shrink_role,
    shrink_program,
)
from orbit.kernels.norm_epilogue import NormEpilogue, norm_kernel_args
from orbit.kernels.norm_prologue import NormPrologue, prenorm_inv, prenorm_x, prologue_kernel_args
from orbit.kernels.pdl import pdl_enter, pdl_launch, prefetch_l2
from orbit.kernels.rmsnorm_exact import add_rmsnorm_row
from orbit.kernels.swiglu import silu_mul_values

# Heuristic constants (pick_gemv_config); sweep them with scripts/bench/bench_qmm.py --gemv.
GEMV_BLOCK_K = 128  # reduction depth per step; fp8_tile needs <= 128 (one scale block)
GEMV_BLOCK_N_SMALL_M = 32  # output columns per program for MP <= 4
GEMV_BLOCK_N_LARGE_M = 16  # ... for MP in 8, 16 (MP partial sums per column stay in registers)
GEMV_WARPS = 4
GEMV_STAGES = 3  # software-pipelining depth of the K loop (tl.range num_stages)
GEMV_MIN_PROGRAMS_PER_SM = 2  # split K when the N tiles alone give fewer programs than this...
GEMV_TARGET_PROGRAMS_PER_SM = 4  # ... and then aim for about this many programs per SM
GEMV_MAX_SPLIT = 16
GEMV_MIN_K_TILES_PER_SPLIT = 2  # every K-slice does at least this many BLOCK_K steps
DEFAULT_NUM_SMS = 132  # H100 SXM; the real count is read off the device when there is one
# The in-kernel split-K fix-up reads the slices in one unrolled step of this many (a launch
# with more slices and a fix-up is refused: split_k_launch)
FIXUP_SLICES = 16
FIXUP_MAX_SPLIT = tl.constexpr(FIXUP_SLICES)
# The nibble-plane kernel (4-bit formats): K depth per step (a multiple of every group size
# it serves: 16..128) and output columns per program.
PLANE_FORMATS = ("int4", "nvfp4", "mxfp4")
PLANES_BLOCK_K = 256
PLANES_BLOCK_K_INT4 = 512  # H100 sweep (session 4): 21.7 vs 23.7 us at 4096x12288, M=1
PLANES_BLOCK_N_SMALL_M = 32
# nvfp4 at M = 1 (H100, session 15, bench_qmm.py --gemv-fp4)
PLANES_BLOCK_N_FP4_M1, PLANES_WARPS_FP4_M1 = 8, 1
PLANES_BLOCK_N_LARGE_M = 16
# FP8 at M <= this runs orbit/kernels/gemv_fp8.py (deferred reduction, integer e4m3 decode);
# a GemvConfig passed explicitly still selects the tile kernel (same-run comparisons). H200,
# session 8: it wins at M = 1 and loses to the tile kernel at M = 4 (6144x2048: 18.0 vs 16.5 us).
FP8_GEMV_MAX_M = 1
# INT4 plane GEMV at M = 1 outside the persistent MLP: no split-K. Where the 32-row tiles
# would not fill the SMs GEMV_MIN_PROGRAMS_PER_SM times, PLANES_BLOCK_N_M1_UNSPLIT-row tiles
# each run the whole K loop instead of K-slices whose partials the last program adds (the
# fix-up's store, atomic and reload are a serial L2 round trip at the end of every GEMV).
# H100, session 18, Qwen3-1.7B batch 1 (bench_engine.py --plane-tiles), chain off: 807.6
# tok/s unsplit 16-row tiles, 806.3 unsplit 8-row, against 761.3 split (and 777.9 with the
# persistent MLP). The persistent MLP (gemv_chain.py) takes these configs too, so that its
# bits equal the separate launches'; with an unsplit down GEMV its dataflow form has no
# K-slices to start early and it loses (759.4 tok/s), hence Engine(chain_mlp) is off by
# default. A module switch so that bench_engine can compare both in one run.
PLANES_M1_UNSPLIT = True
PLANES_BLOCK_N_M1_UNSPLIT = 16
# K depth per step of those unsplit programs where K holds at least two such steps; None:
# the general rule (PLANES_BLOCK_K_INT4 where K >= 4 of its steps). A deeper step puts more
# words in flight per program (docs/rollout.md, "bytes in flight per SM"); sweep with
# bench_engine.py --knob orbit.kernels.gemv.PLANES_BLOCK_K_M1_UNSPLIT=None,1024. None: 1024
# measured slower (session 20, H100, Qwen3-1.7B INT4 batch 1: 762.6 -> 710.0 tok/s).
PLANES_BLOCK_K_M1_UNSPLIT: int | None = None
# The plane formats the unsplit rule takes (NVFP4 and MXFP4 not measured unsplit yet; compare
# with bench_engine.py --knob "orbit.kernels.gemv.PLANES_M1_UNSPLIT_FORMATS=...").
PLANES_M1_UNSPLIT_FORMATS = ("int4",)
# GemvConfig.l2_prefetch of the heuristic configs (a module switch so that bench_engine can
# compare both in one run: --l2-prefetch both). Off: in one H200 run the Qwen3-1.7B INT4
# batch-1 engine ran 742.7 tok/s with PDL alone and 693.2 with the prefetch as well, although
# the isolated GEMV benchmark gains from it on some shapes (NVFP4 4096x12288: 29.6 -> 25.7 us).
PDL_L2_PREFETCH = False
# GemvConfig.w_preload of the heuristic plane configs (bench_engine.py --w-preload). Off:
# measured slower in the H100 engine (session 18, Qwen3-1.7B INT4 batch 1: 748.4 tok/s without,
# 752.1 / 662.4 with 1 / 2 preloaded steps; docs/rollout.md).
PDL_W_PRELOAD = 0
# (The group scales through the K loop's cp.async pipeline as int32 words, and a one-step
# register prefetch of them, were built in session 19 and removed in session 20: slower in
# the H100 engine, 762 -> 709 and 762 -> 753 tok/s at Qwen3-1.7B INT4 batch 1, and no change
# in the isolated kernel's stall profile; docs/rollout.md, "Why a small GEMV streams slowly".)
# NVFP4 in the heuristic plane configs: E2M1 decoded as fp32 bits (GemvConfig.e2m1 = 2), the
# same output bits as the fp16 decode; measured (H100, 4096x12288, M = 1) 27.6 vs 30.4 us, M = 4
# 72.3 vs 87.3 (docs/kernels.md, "Nibble decodes with fewer instructions"). A module switch so
# that bench_engine can compare both in one run (--nibble-decodes both).
NVFP4_FP32_DECODE = True


@dataclass(frozen=True)
class GemvConfig:
    """block_n output columns x block_k reduction per step; split K-slices (1: no workspace)."""

    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int
    unpack: int = -1  # see orbit/kernels/_tiles.py; -1: _qgemm.DEFAULT_UNPACK for the format
    planes: bool = True  # nibble formats: the nibble-plane kernel (below) instead of the tile one
    # FP4 in the plane kernel, the E2M1 decode (_plane_values): 0 fp16 bits + an fp16 -> fp32
    # convert; 1 fp32 bits with a select for the two subnormal codes; 2 fp32 bits of the value
    # * 2^-126 for every code, the 2^126 folded into x and the scale (NVFP4 only: MXFP4's E8M0
    # scales reach 2^127, so it keeps 1). Measured against each other by bench_qmm.py --gemv
    # --gemv-decodes. pick_gemv_config sets 2 for NVFP4 (NVFP4_FP32_DECODE).
    e2m1: int = 0
    # Split-K: the last K-slice program of each column tile adds the slices' fp32 partials
    # itself (an arrival counter per tile), instead of a second `_splitk_reduce_kernel` launch.
    fixup: bool = True
    # Nibble-plane kernel: per-word partials reduced once after the K loop, int4 nibbles
    # decoded in place (see _gemv_planes_kernel); False keeps the per-step reduction and the
    # shift-and-extract decode, for same-run comparison (bench_qmm.py --gemv-sweep).
    defer: bool = True
    # Nibble-plane kernel: load the next K step's x during this one (_gemv_planes_kernel XPRE).
    x_prefetch: bool = False
    # Programmatic dependent launch (orbit/kernels/pdl.py), where the device has it.
    pdl: bool = False
    # With PDL: bulk-prefetch the first pipeline steps' weights into L2 before waiting on the
    # previous kernel (pdl.prefetch_l2). pick_gemv_config sets it from PDL_L2_PREFETCH.
    l2_prefetch: bool = False
    # Nibble-plane kernel: the first w_preload (0, 1 or 2) K steps' words and scales are
    # loaded into registers before the PDL wait (they are frozen: no hazard with the previous
    # kernel), so that with PDL they stream in while the previous kernel finishes (with
    # pdl.EARLY_RELEASE, while the kernels before it finish). pick_gemv_config sets it from
    # PDL_W_PRELOAD.
    w_preload: int = 0


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (DEFAULT_NUM_SMS off CUDA, e.g. the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def pick_gemv_config(m: int, n: int, k: int, fmt: str, sms: int = DEFAULT_NUM_SMS) -> GemvConfig:
    """Tile shape and split for a decode call. Columns per program shrink as M grows (MP
    accumulators per column); K is split only when the N tiles leave the SMs under-filled
    (fewer than GEMV_MIN_PROGRAMS_PER_SM per SM), into as many slices as bring the grid to
    about GEMV_TARGET_PROGRAMS_PER_SM per SM, each at least GEMV_MIN_K_TILES_PER_SPLIT steps
    deep. The slice depth is rounded so that no slice is empty. 4-bit formats run the
    nibble-plane kernel with a deeper step (PLANES_BLOCK_K). INT4 at M = 1 is not split
    (PLANES_M1_UNSPLIT)."""
    mp = triton.next_power_of_2(max(m, 1))
    planes = fmt in PLANE_FORMATS
    if planes:
        block_n = PLANES_BLOCK_N_SMALL_M if mp <= 4 else PLANES_BLOCK_N_LARGE_M
        # Short K (the SmolLM2 shapes): shallower steps leave room to split K.
        deep = PLANES_BLOCK_K_INT4 if fmt == "int4" else PLANES_BLOCK_K
        block_k = deep if k >= 4 * deep else GEMV_BLOCK_K
    else:
        block_n = GEMV_BLOCK_N_SMALL_M if mp <= 4 else GEMV_BLOCK_N_LARGE_M
        block_k = GEMV_BLOCK_K
    k_tiles = triton.cdiv(k, block_k)
    # The deferred plane reduction holds an [rows, MP, groups, words] accumulator: it wins at
    # M = 1 and loses at M = 4 on the narrow Qwen3 shapes (H200, session 6), so M = 1 only;
    # the x prefetch was measured at M = 1 only (faster on every shape), and FP4 at M = 1 ran
    # fastest with narrow programs: 16 rows x 2 warps on the H200 in session 6 (4096x12288:
    # 28.4 vs 32.7 us), 8 rows x 1 warp on the H100 in session 15 with the fp32-bit decode
    # (21.6 vs 27.2 us: more programs, each holding fewer words in flight per thread).
    # (The FP4 tile is narrowed after the split is chosen, as it was measured.)
    one = planes and mp == 1
    if one and fmt in PLANES_M1_UNSPLIT_FORMATS and PLANES_M1_UNSPLIT:
        if triton.cdiv(n, block_n) < GEMV_MIN_PROGRAMS_PER_SM * sms:
            block_n = PLANES_BLOCK_N_M1_UNSPLIT
        deep_m1 = PLANES_BLOCK_K_M1_UNSPLIT
        if deep_m1 is not None and k >= 2 * deep_m1:
            block_k = deep_m1
        split = 1
    else:
        split = split_k(triton.cdiv(n, block_n), k_tiles, sms)
    warps = GEMV_WARPS
    if one and fmt == "nvfp4":  # (mxfp4 not measured: it keeps the int4 tile)
        block_n, warps = PLANES_BLOCK_N_FP4_M1, PLANES_WARPS_FP4_M1
    return GemvConfig(block_n=block_n, block_k=block_k, split=split, warps=warps,
                      stages=GEMV_STAGES, planes=planes, defer=one, x_prefetch=one,
                      l2_prefetch=PDL_L2_PREFETCH, w_preload=PDL_W_PRELOAD if planes else 0,
                      e2m1=2 if NVFP4_FP32_DECODE and fmt == "nvfp4" else 0)


def split_k(n_tiles: int, k_tiles: int, sms: int) -> int:
    """K-slices for a grid of `n_tiles` column tiles over `k_tiles` steps: 1 when the tiles
    alone give GEMV_MIN_PROGRAMS_PER_SM programs per SM, else about
    GEMV_TARGET_PROGRAMS_PER_SM per SM, each slice at least GEMV_MIN_K_TILES_PER_SPLIT steps
    deep and none empty."""
    if n_tiles >= GEMV_MIN_PROGRAMS_PER_SM * sms:
        return 1
    want = triton.cdiv(GEMV_TARGET_PROGRAMS_PER_SM * sms, n_tiles)
    most = max(1, k_tiles // GEMV_MIN_K_TILES_PER_SPLIT)
    split = max(1, min(want, most, GEMV_MAX_SPLIT))
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty slice


def split_k_launch(x: Tensor, y: Tensor, n: int, k: int, block_n: int, block_k: int,
                   split: int, fixup: bool = True) -> tuple:
    """The launch plan of a (split-K) GEMV: (grid, K_PER, SPLIT, out, stride_om, stride_os,
    counters or None, fixup). Without split, `out` is y; with split, a fresh fp32 workspace
    [split, M, N] whose slices the last-arriving program adds (fixup) or a second launch."""
    m = x.shape[0]
    k_tiles = triton.cdiv(k, block_k)
    k_per = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(k, k_per)  # slices that hold at least one K tile
    grid = (triton.cdiv(n, block_n), split)
    fixup = split > 1 and fixup
    if fixup and split > FIXUP_SLICES:
        raise ValueError(f"split-K GEMV with {split} K-slices and the in-kernel fix-up; at most "
                         f"{FIXUP_SLICES} (GemvConfig(fixup=False) takes more)")
    cnt = arrival_counters(x.device, grid[0]) if fixup else None
    if split > 1:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        return grid, k_per, split, out, out.stride(1), out.stride(0), cnt, fixup
    return grid, k_per, split, y, y.stride(0), 0, cnt, fixup


@triton.jit
def _program_slice(K_PER, K, N, BN: tl.constexpr, PN, SHRINK: tl.constexpr,
                   PAIR: tl.constexpr, HALF_N):
    """This program's K-slice [k_lo, k_hi) and output rows (offs_n, in range: row_ok). With
    SHRINK the first PN grid columns are LoRA shrink programs (lora_epilogue.lora_shrink_role),
    so the column tile is program_id(0) - PN (negative for them: no rows in range)."""
    pid_k = tl.program_id(1)
    if SHRINK:
        pid_n = tl.program_id(0) - PN
    else:
        pid_n = tl.program_id(0)
    k_lo, k_hi, offs_n, row_ok = tile_slice(pid_n, pid_k, K_PER, K, N, BN, SHRINK, PAIR, HALF_N)
    return pid_n, pid_k, k_lo, k_hi, offs_n, row_ok


@triton.jit
def tile_slice(pid_n, pid_k, K_PER, K, N, BN: tl.constexpr, SHRINK: tl.constexpr,
               PAIR: tl.constexpr, HALF_N):
    """Column tile pid_n's rows (offs_n, in range: row_ok) and K-slice pid_k's [k_lo, k_hi).
    PAIR (the stacked gate/up weight, gate rows [0, HALF_N), up rows [HALF_N, N)): tile t holds
    gate rows t*BN/2.. and the matching up rows, so its store can apply SwiGLU; rows past the
    gate's end get index N (out of range everywhere). SHRINK: pid_n may be negative."""
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    if PAIR:
        HB: tl.constexpr = BN // 2
        j = tl.arange(0, BN)
        g_row = pid_n * HB + j % HB  # the gate row this row belongs to
        offs_n = tl.where((g_row >= 0) & (g_row < HALF_N), g_row + (j // HB) * HALF_N, N)
    else:
        offs_n = pid_n * BN + tl.arange(0, BN)
    if SHRINK:
        row_ok = (offs_n >= 0) & (offs_n < N)
    else:
        row_ok = offs_n < N
    return k_lo, k_hi, offs_n, row_ok


@triton.jit
def prefetch_first_steps(q_ptr, offs_n, row_ok, stride_q, k_lo, k_hi, BK: tl.constexpr,
                         STAGES: tl.constexpr, ELEMS_PER_UNIT: tl.constexpr,
                         BYTES_PER_STEP: tl.constexpr):
    """With PDL (GemvConfig.l2_prefetch): the weight rows' first STAGES - 1 steps into L2
    before the kernel waits on the previous one. q_ptr's units hold ELEMS_PER_UNIT weights
    (int4 words: 8; FP8 words: 4; FP8 bytes: 1)."""
    steps = tl.minimum(STAGES - 1, tl.cdiv(k_hi - k_lo, BK))
    rows = tl.where(row_ok, offs_n, 0) * stride_q
    prefetch_l2(q_ptr + rows + k_lo // ELEMS_PER_UNIT, steps * BYTES_PER_STEP)


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, K_PER,
                 SPLIT, stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym,
                 h_ptr, a0, a1, a2, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm, hc_ptr, LSR,
                 r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
                 FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 UNPACK: tl.constexpr, STAGES: tl.constexpr, FIXUP: tl.constexpr,
                 PDL: tl.constexpr = False, LORA: tl.constexpr = 0, LRP: tl.constexpr = 1,
                 SHRINK: tl.constexpr = False, SBK: tl.constexpr = 16,
                 NORM: tl.constexpr = False, NB: tl.constexpr = 16):
    # (SHRINK, computing h in the launch, is the plane and FP8 GEMVs'; never set here.)
    # out[pid_k, m, n] = sum over this program's K-slice of x[m, k] * W[n, k] (fp32 sums; cast
    # to out's dtype on store: the activation dtype without split, fp32 into the workspace).
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    dt = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BK)
    cols = tl.arange(0, MP)
    offs_n = n0 + tl.arange(0, BN)
    lora_d = _lora_d(offs_n, cols, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm, dt,
                     LORA, LRP, False)
    # acc[n, m]: column m holds row m's sums; [BN, MP] lets the per-row partial [BN] broadcast
    # along dim 1 in the weight tile's own layout.
    acc = tl.zeros((BN, MP), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
        w = _w_tile(q_ptr, s_ptr, o_ptr, g_ptr, stride_q, stride_s, n0, k0, N, K,
                    FMT, GROUP, HAS_OFFSET, BN, BK, UNPACK)  # [BN, BK] fp32
        w = w.to(dt).to(tl.float32)  # the reference's rounded weights
        kmask = k0 + offs_k < K
        for m in tl.static_range(MP):
            # (a [BK] row test, not a scalar `m < M`: Triton 3.9's interpreter rejects a
            # block mask combined with a scalar one)
            row_ok = (offs_k * 0 + m) < M
            xm = tl.load(x_ptr + m * stride_xm + k0 + offs_k, mask=kmask & row_ok, other=0.0)
            part = tl.sum(w * xm.to(tl.float32)[None, :], axis=1)  # [BN]
            acc = tl.where(cols[None, :] == m, acc + part[:, None], acc)
    _store_out(acc, out_ptr, y_ptr, cnt_ptr, pid_n, pid_k, SPLIT, M, N, offs_n, cols,
               stride_om, stride_os, stride_ym, FIXUP, lora_d, h_ptr, b0, b1, b2, LN0, LN1, LR,
               lscale, stride_hm, hc_ptr, LSR, LORA, LRP, False, False, 0, False, r_ptr, nw_ptr,
               ns_ptr, nx_ptr, ncnt_ptr, NT, eps, NORM, NB)


@triton.jit
def _store_out(acc, out_ptr, y_ptr, cnt_ptr, pid_n, pid_k, SPLIT, M, N, offs_n, cols,
               stride_om, stride_os, stride_ym, FIXUP: tl.constexpr, lora_d, h_ptr, b0, b1,
               b2, LN0, LN1, LR, lscale, stride_hm, hc_ptr, LSR, LORA: tl.constexpr,
               LRP: tl.constexpr, SHRINK: tl.constexpr, PAIR: tl.constexpr, HALF_N,
               LIBDEV: tl.constexpr, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
               NORM: tl.constexpr, NB: tl.constexpr):
    # acc [BN, MP] fp32 -> out[pid_k] (y itself without split, else the fp32 workspace slice).
    # FIXUP: each program of column tile pid_n bumps the tile's arrival counter after its
    # slice is stored; the one that arrives last adds all SPLIT slices in slice order (so the
    # sum does not depend on arrival order: deterministic) into y and re-arms the counter to 0
    # for the next launch (CUDA-graph replays reuse it). The barrier + acq_rel atomic is the
    # release/acquire pair that makes the other programs' slices visible; .cg loads read them
    # from L2, never a stale L1 line.
    # LORA (members, 0 = none): the program that writes y's final values adds the adapter
    # delta: lora_d, computed before the main loop, or with SHRINK (h computed by this launch's
    # shrink programs) computed here once h is complete (lora_epilogue.lora_await_delta). The
    # launch makes sure that program is this one or the fix-up's, never the reduce launch.
    # PAIR: y is SwiGLU's output [M, HALF_N]: the final values' gate and up halves are
    # combined (swiglu.silu_mul_values) and stored at the tile's gate columns (_store_pair).
    # NORM: the tile's final writer then arrives at the grid-wide norm counter (_norm_tail).
    mask = (offs_n[:, None] < N) & (cols[None, :] < M)
    ptrs = out_ptr + pid_k * stride_os + cols[None, :] * stride_om + offs_n[:, None]
    dt = y_ptr.dtype.element_ty
    if FIXUP:
        tl.store(ptrs, acc, mask=mask)  # fp32 workspace slice
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            base = out_ptr + cols[None, :] * stride_om + offs_n[:, None]
            # unrolled (masked past SPLIT: an exact +0), so every slice's load is in flight at
            # once instead of one L2 round trip per iteration; the adds stay in slice order
            for s in tl.static_range(FIXUP_MAX_SPLIT):
                live = (cols[None, :] * 0 + s) < SPLIT  # (a block mask: see _gemv_kernel)
                total += tl.load(base + s * stride_os, mask=mask & live, other=0.0,
                                 cache_modifier=".cg")
            d = _store_delta(lora_d, offs_n, cols, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR,
                             lscale, stride_hm, hc_ptr, LSR, dt, LORA, LRP, SHRINK)
            if PAIR:
                _store_pair(_final(total, d, dt, LORA), y_ptr, stride_ym, pid_n, cols, M,
                            HALF_N, LIBDEV)
            else:
                tl.store(y_ptr + cols[None, :] * stride_ym + offs_n[:, None],
                         _final(total, d, dt, LORA), mask=mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")
            if NORM:
                _norm_tail(y_ptr, stride_ym, M, N, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT,
                           eps, NB)
    else:  # y (LORA: always; the launch forces the fix-up for a split), or a workspace slice
        d = _store_delta(lora_d, offs_n, cols, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale,
                         stride_hm, hc_ptr, LSR, dt, LORA, LRP, SHRINK)
        if PAIR:  # (the launch forces the fix-up for a split: out is y here)
            _store_pair(_final(acc, d, dt, LORA), y_ptr, stride_ym, pid_n, cols, M, HALF_N,
                        LIBDEV)
        else:
            tl.store(ptrs, _final(acc, d, out_ptr.dtype.element_ty, LORA), mask=mask)
        if NORM:  # (the launch forces the fix-up for a split: out is y here)
            _norm_tail(y_ptr, stride_ym, M, N, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
                       NB)


@triton.jit
def _norm_tail(y_ptr, stride_ym, M, N, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
               NB: tl.constexpr):
    """After this program stored its tile's final y: arrive at the grid-wide counter; the
    last of the NT column tiles to arrive sees every tile's y (barrier + acq_rel atomic, as
    the split-K fix-up) and runs the residual add + RMSNorm on each row
    (orbit/kernels/norm_epilogue.py), then re-arms the counter."""
    tl.debug_barrier()
    done = tl.atomic_add(ncnt_ptr, 1, sem="acq_rel")
    if done == NT - 1:
        for m in range(M):
            add_rmsnorm_row(y_ptr + m * stride_ym, r_ptr + m * N, nw_ptr, ns_ptr + m * N,
                            nx_ptr + m * N, N, eps, NB, True, True)
        tl.atomic_xchg(ncnt_ptr, 0, sem="relaxed")


@triton.jit
def _store_delta(lora_d, offs_n, cols, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale,
                 stride_hm, hc_ptr, LSR, dt: tl.constexpr, LORA: tl.constexpr,
                 LRP: tl.constexpr, SHRINK: tl.constexpr):
    """The delta the final writer adds: lora_d (computed before the main loop), or with SHRINK
    the one it computes now, once this launch's shrink programs are done."""
    if SHRINK:
        return lora_await_delta(offs_n, cols, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale,
                                stride_hm, hc_ptr, LSR, dt, LORA, LRP)
    else:
        return lora_d


@triton.jit
def _store_pair(vals, y_ptr, stride_ym, pid_n, cols, M, HALF_N, LIBDEV: tl.constexpr):
    """vals [BN, MP]: the tile's gate rows then the matching up rows (_program_slice, PAIR),
    in y's dtype -> y[m, gate column] = silu(gate) * up, torch's roundings."""
    BN: tl.constexpr = vals.shape[0]
    MP: tl.constexpr = vals.shape[1]
    HB: tl.constexpr = BN // 2
    g, u = tl.split(tl.permute(tl.reshape(vals, (2, HB, MP)), (1, 2, 0)))  # [HB, MP] each
    act = silu_mul_values(g, u, y_ptr.dtype.element_ty, LIBDEV)
    jj = pid_n * HB + tl.arange(0, HB)
    tl.store(y_ptr + cols[None, :] * stride_ym + jj[:, None], act,
             mask=(jj < HALF_N)[:, None] & (cols < M)[None, :])


@triton.jit
def _final(acc, lora_d, dt: tl.constexpr, LORA: tl.constexpr):
    """acc in the stored dtype, plus the LoRA delta where there is one."""
    if LORA > 0:
        return lora_add(acc, lora_d, dt)
    else:
        return acc.to(dt)


@triton.jit
def _lora_d(offs_n, rows, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm,
            dt: tl.constexpr, LORA: tl.constexpr, LRP: tl.constexpr, SHRINK: tl.constexpr):
    """The LoRA delta of this program's tile before the main loop (0.0 without LORA, and with
    SHRINK, whose h is not ready yet: _store_out computes it then)."""
    if LORA > 0 and not SHRINK:
        return lora_delta(offs_n, rows, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale,
                          stride_hm, dt, LORA, LRP, False)
    else:
        return 0.0


# Nibble-plane codes: what a 4-bit code u becomes before the group scale (see _plane_values).
PLANE_CODES = {("int4", False): 0, ("int4", True): 1, "nvfp4": 2, "mxfp4": 2}


def plane_code(fmt: str, asym: bool, e2m1: int) -> int:
    """The plane kernel's CODE for `fmt` (int4 symmetric or with offsets) and
    GemvConfig.e2m1: FP4 takes 3 (fp32 bits + select) or, for NVFP4 with e2m1 = 2, 4 (the
    2^-126-scaled fp32 bits) in place of 2 (fp16 bits)."""
    code = PLANE_CODES[(fmt, asym)] if fmt == "int4" else PLANE_CODES[fmt]
    if code == 2 and e2m1:
        code = 4 if e2m1 == 2 and fmt == "nvfp4" else 3
    return code


@triton.jit
def _plane_values(words, I: tl.constexpr, CODE: tl.constexpr):  # noqa: E741
    """Nibble I of every int32 word as float32, before the group scale. Int codes: the 2^23
    trick of int4.int4_codes (no int->float convert). E2M1 codes (FP4): CODE 2 makes value *
    2^-14 through fp16 bits (fp4.e2m1_scaled; the kernel folds the 2^14 into the scale), which
    costs an fp16 -> fp32 convert per element; CODE 3 builds the fp32 value's bits directly
    (GemvConfig.e2m1 = 1); CODE 4 the bits of value * 2^-126 (GemvConfig.e2m1 = 2)."""
    u = (words >> (4 * I)) & 0xF
    if CODE <= 1:
        v = int4_codes(u, CODE == 0)  # u - 8 (symmetric) or u
    elif CODE == 2:
        v = e2m1_scaled(u)
    elif CODE == 4:
        v = _e2m1_fp32_bits(words, I)
    else:
        # E2M1 built as fp32 bits, no convert: magnitudes 1..6 (e >= 1) are the fp32 whose
        # exponent/mantissa bits are (e + 126, m), i.e. (em + 252) << 22; the two subnormal
        # codes (0 and 0.5) are selected: (-em) & 0x3F000000 is 0 for em = 0, 0.5 for em = 1.
        em = u & 7
        mag = tl.where(em >= 2, (em + 252) << 22, (0 - em) & 0x3F000000)
        v = (mag | ((u & 8) << 28)).to(tl.float32, bitcast=True)
    return v


# CODE 4: the powers of two that undo the 2^-126 (split between x, before the products, and
# the group scale, after the sums: every product and partial sum stays a normal fp32 for |x| in
# [2^-63, 2^63] and E4M3 scales, so the sums are CODE 2's scaled by exact powers of two: the
# same bits), and the int32 0x81C00000 (the sign bit and fp32 bits 22..24).
E2M1_X_UP = tl.constexpr(2.0**64)
E2M1_S_UP = tl.constexpr(2.0**62)
E2M1_BITS = tl.constexpr(-2118123520)


@triton.jit
def _e2m1_fp32_bits(words, I: tl.constexpr):  # noqa: E741
    """Nibble I of int32 words as the float32 E2M1 value * 2^-126, in 3 integer ops (2 for
    nibble 7) and no convert: the nibble moved to the word's top 4 bits, then an arithmetic
    shift right by 6 keeps the sign at bit 31 and puts the magnitude bits (e1 e0 m) at fp32 bits
    22..24 (exponent field e, top mantissa bit m: 2^(e-127) (1 + m/2) = 2^-126 * 2^(e-1)
    (1 + m/2) for e >= 1, and the fp32 subnormal m * 2^-127 = 2^-126 * m/2 for e = 0); one AND
    clears the sign's copies (bits 25..30) and the other nibbles' bits. (Two shifts and an
    AND-OR of two masks compile to 4 ops: LOP3 takes one immediate.)"""
    if I < 7:
        top = words << (28 - 4 * I)
    else:
        top = words
    return ((top >> 6) & E2M1_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _or_2p23(words, ASM: tl.constexpr):
    """`words | 0x4B000000` where the compiler cannot see it (ASM: inline PTX, on CUDA): LLVM
    otherwise rewrites each `(w | C) & (M | C)` of _int4_plane_masked back to `(w & M) | C`,
    which needs C in a register and re-materializes it (one MOV per nibble in the SASS). The
    interpreter (CPU tests) runs the plain OR."""
    if not ASM:
        return words | 0x4B000000
    return tl.inline_asm_elementwise("or.b32 $0, $1, 0x4B000000;", "=r,r", [words],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _int4_plane_masked(biased, P: tl.constexpr, SYMMETRIC: tl.constexpr):
    """Nibble P (0..3) of int32 words, left in place, as float32 (u - 8) * 16^P (symmetric) or
    u * 16^P. `biased` is `words | 0x4B000000` (2^23's bits), made once per word: then
    `biased & (mask | 0x4B000000)` is `(words & mask) | 0x4B000000`, the float 2^23 + u * 16^P
    (exact: u * 16^P < 2^16 fits the mantissa), in one AND with one immediate, and one FADD
    removes 2^23 (+ 8 * 16^P). No shift per nibble; callers scale x by 16^-P instead (a power
    of two: the products are those of int4.int4_codes' values, bit for bit)."""
    bias = 8388608.0 + (8.0 * (16.0 ** P) if SYMMETRIC else 0.0)
    return (biased & ((0xF << (4 * P)) | 0x4B000000)).to(tl.float32, bitcast=True) - bias


@triton.jit
def _x_planes(x_ptr, k0, k_hi, stride_xm, M, GROUP: tl.constexpr, NG: tl.constexpr,
              WG: tl.constexpr, MP: tl.constexpr, r_ptr=None, nw_ptr=None, inv=0.0,
              PRENORM: tl.constexpr = False):
    """The 8 nibble planes' x for the step at k0, as a tuple of float32 [MP, NG, WG]: plane i
    holds x[m, g*GROUP + 8j + i] (zero past k_hi or M). PRENORM: x_ptr is the delta, and
    plane i is rmsnorm(delta + r) * w at those columns (norm_prologue.prenorm_x; inv [MP])."""
    ag = tl.arange(0, NG)
    aj = tl.arange(0, WG)
    am = tl.arange(0, MP)
    kg = k0 + ag * GROUP  # first column of each group of the step
    ptrs = x_ptr + am[:, None, None] * stride_xm + kg[None, :, None] + (aj * 8)[None, None, :]
    ok = (am[:, None, None] < M) & (kg < k_hi)[None, :, None]
    if PRENORM:  # (the weight's offsets in the x offsets' shape: a load broadcasts no pointer)
        kcol = (am * 0)[:, None, None] + kg[None, :, None] + (aj * 8)[None, None, :]
        off = am[:, None, None] * stride_xm + kcol
        iv = inv[:, None, None]
        return (prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 0, kcol + 0, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 1, kcol + 1, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 2, kcol + 2, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 3, kcol + 3, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 4, kcol + 4, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 5, kcol + 5, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 6, kcol + 6, ok),
                prenorm_x(x_ptr, r_ptr, nw_ptr, iv, off + 7, kcol + 7, ok))
    return (tl.load(ptrs + 0, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 1, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 2, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 3, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 4, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 5, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 6, mask=ok, other=0.0).to(tl.float32),
            tl.load(ptrs + 7, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _plane_words(q_ptr, offs_n, row_ok, stride_q, k0, k_hi, GROUP: tl.constexpr,
                 NG: tl.constexpr, WG: tl.constexpr):
    """The packed int32 words of the step at k0: [BN, NG, WG] (zero past k_hi)."""
    ag = tl.arange(0, NG)
    aj = tl.arange(0, WG)
    kg = k0 + ag * GROUP
    g = k0 // GROUP + ag
    return tl.load(q_ptr + offs_n[:, None, None] * stride_q + (g * WG)[None, :, None]
                   + aj[None, None, :], mask=row_ok[:, None, None] & (kg < k_hi)[None, :, None],
                   other=0)


@triton.jit
def plane_loads(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q, stride_s, k0, k_hi, n_groups,
                FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
                HAS_OFFSET: tl.constexpr, NG: tl.constexpr):
    """The frozen operands of the step at k0: its words [BN, NG, GROUP/8] and _plane_scales.
    No x: with PDL these may be loaded before the wait (GemvConfig.w_preload)."""
    words = _plane_words(q_ptr, offs_n, row_ok, stride_q, k0, k_hi, GROUP, NG, GROUP // 8)
    sc, off = _plane_scales(s_ptr, o_ptr, offs_n, row_ok, stride_s, k0, n_groups, FMT, CODE,
                            GROUP, HAS_OFFSET, NG)
    return words, sc, off


@triton.jit
def preload_steps(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q, stride_s, k_lo, k_hi, K,
                  FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
                  HAS_OFFSET: tl.constexpr, NG: tl.constexpr, STEPS: tl.constexpr):
    """plane_loads of the K-slice's first STEPS (0-2) steps, as (w0, s0, o0, w1, s1, o1),
    placeholders where not loaded (GemvConfig.w_preload; a step past k_hi loads nothing)."""
    w0, s0, o0, w1, s1, o1 = 0, 0.0, 0.0, 0, 0.0, 0.0
    if STEPS > 0:
        w0, s0, o0 = plane_loads(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q, stride_s, k_lo,
                                 k_hi, K // GROUP, FMT, CODE, GROUP, HAS_OFFSET, NG)
    if STEPS > 1:
        w1, s1, o1 = plane_loads(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q, stride_s,
                                 k_lo + NG * GROUP, k_hi, K // GROUP, FMT, CODE, GROUP,
                                 HAS_OFFSET, NG)
    return w0, s0, o0, w1, s1, o1


@triton.jit
def _plane_scales(s_ptr, o_ptr, offs_n, row_ok, stride_s, k0, n_groups, FMT: tl.constexpr,
                  CODE: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  NG: tl.constexpr):
    """The step's group scales as float32 [BN, NG] (with the decode's power-of-two factor)
    and, for asymmetric int4, the offsets (else the scales again, unused)."""
    g = k0 // GROUP + tl.arange(0, NG)  # [NG] group index
    sp = offs_n[:, None] * stride_s + g[None, :]
    s_ok = row_ok[:, None] & (g < n_groups)[None, :]
    if FMT == 4:  # MXFP4: E8M0 exponent byte
        sc = e8m0_scale(tl.load(s_ptr + sp, mask=s_ok, other=0).to(tl.int32))
    else:  # int4 bf16/fp16/fp32 scale; NVFP4 e4m3 (its fp32 global scale comes at the end)
        sc = tl.load(s_ptr + sp, mask=s_ok, other=0.0).to(tl.float32)
    if CODE == 2:
        sc = sc * 16384.0  # e2m1_scaled's 2^-14
    elif CODE == 4:
        sc = sc * E2M1_S_UP
    off = sc
    if HAS_OFFSET:
        off = tl.load(o_ptr + sp, mask=s_ok, other=0.0).to(tl.float32)
    return sc, off


@triton.jit
def _plane_products(words, x_cur, CODE: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    MP: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, WG: tl.constexpr,
                    DEFER: tl.constexpr, ASM: tl.constexpr):
    """One K step's unscaled products: the 8 nibble planes' codes times their x, cx
    [BN, MP, NG, WG], and (asymmetric int4) the x sums xs [MP, NG, WG]."""
    cx = tl.zeros((BN, MP, NG, WG), dtype=tl.float32)
    xs = tl.zeros((MP, NG, WG), dtype=tl.float32)
    if DEFER and CODE <= 1:  # per word, shared by 4 planes each (see _int4_plane_masked)
        lo = _or_2p23(words, ASM)
        hi = _or_2p23(words >> 16, ASM)  # nibbles 4..7 at bits 0..15
    for i in tl.static_range(8):
        xi = x_cur[i]
        if DEFER and CODE <= 1:
            v = _int4_plane_masked(lo if i < 4 else hi, i % 4, CODE == 0)
            cx += v[:, None, :, :] * (xi * (1.0 / 16.0 ** (i % 4)))[None, :, :, :]
        elif CODE == 4:
            cx += _plane_values(words, i, CODE)[:, None, :, :] * (xi * E2M1_X_UP)[None, :, :, :]
        else:
            cx += _plane_values(words, i, CODE)[:, None, :, :] * xi[None, :, :, :]
        if HAS_OFFSET:
            xs += xi
    return cx, xs


@triton.jit
def _plane_accumulate(cx, xs, sc, off, acc, acc4, HAS_OFFSET: tl.constexpr,
                      DEFER: tl.constexpr):
    """The step's products scaled per group, into acc4 (DEFER) or acc."""
    if DEFER:
        acc4 += cx * sc[:, None, :, None]
        if HAS_OFFSET:
            acc4 += off[:, None, :, None] * xs[None, :, :, :]
    else:
        contrib = tl.sum(cx, axis=3) * sc[:, None, :]  # [BN, MP, NG]
        if HAS_OFFSET:
            contrib += off[:, None, :] * tl.sum(xs, axis=2)[None, :, :]
        acc += tl.sum(contrib, axis=2)
    return acc, acc4


@triton.jit
def _gemv_planes_kernel(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K,
                        K_PER, SPLIT, stride_xm, stride_om, stride_os, stride_q, stride_s,
                        stride_ym, h_ptr, a0, a1, a2, b0, b1, b2, LN0, LN1, LR, lscale,
                        stride_hm, hc_ptr, LSR, HALF_N, r_ptr, nw_ptr, ns_ptr, nx_ptr,
                        ncnt_ptr, NT, eps, FMT: tl.constexpr, CODE: tl.constexpr,
                        GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, MP: tl.constexpr,
                        BN: tl.constexpr, NG: tl.constexpr, STAGES: tl.constexpr,
                        FIXUP: tl.constexpr,
                        DEFER: tl.constexpr, ASM: tl.constexpr, XPRE: tl.constexpr,
                        PDL: tl.constexpr = False, L2PRE: tl.constexpr = False,
                        LORA: tl.constexpr = 0, LRP: tl.constexpr = 1,
                        SHRINK: tl.constexpr = False, SBK: tl.constexpr = 16,
                        PAIR: tl.constexpr = False, NORM: tl.constexpr = False,
                        NB: tl.constexpr = 16, WPRE: tl.constexpr = 0,
                        PRENORM: tl.constexpr = False):
    # Same contract as _gemv_kernel for 4-bit codes packed 8 to an int32 word (int4 as stored;
    # FP4 bytes viewed as int32: little-endian, so nibble i of word j is column 8j + i either
    # way). Instead of building the [BN, BK] weight tile (join tree, group-scale reshape, bf16
    # round), it keeps the words as [BN, NG, GROUP/8] (NG groups per step) and, for each of the
    # 8 nibble planes, multiplies the plane's codes by the x elements they meet (x[8j + i],
    # a strided load that L1 serves). A group's sum of code * x is scaled once:
    #   sum_k w_k x_k = s * sum_k c_k x_k (+ o * sum_k x_k for asymmetric int4, w = u s + o).
    # DEFER (GemvConfig.defer; pick_gemv_config sets it at M = 1): the scaled per-word
    # partials stay in a [BN, MP, NG, WG] register accumulator across K steps and are reduced
    # once after the loop (the per-step reduction over words and groups cost ~1 shuffle + 2
    # adds per nibble in SASS), and int4 nibbles are decoded in place (_int4_plane_masked: 2
    # ops per nibble instead of shift + extract + or + add).
    # XPRE (GemvConfig.x_prefetch): x's plane loads are 2-byte strided loads, which the
    # software pipeline of the word loads (cp.async, 4/8/16-byte only) cannot take, so each
    # step waits on them; with XPRE each step loads the next step's x before computing its own.
    # Fast mode only: the weights are not rounded to bf16 first, so the sums differ from the
    # reference's in the last bits (more exact, not less).
    # SHRINK (a LoRA epilogue whose h this launch computes): the first PN grid columns are
    # shrink programs (lora_epilogue.lora_shrink_role) instead of column tiles.
    # PAIR (the stacked gate/up weight; gate rows [0, HALF_N)): each tile holds matching gate
    # and up rows, and y is SwiGLU's output [M, HALF_N] (_program_slice, _store_pair).
    # PRENORM (orbit/kernels/norm_prologue.py): x_ptr is the delta of a residual add whose
    # RMSNorm is this GEMV's input: every program reduces the rows first (inv), program (0, 0)
    # stores s = r + delta at ns_ptr, and the K loop builds x from delta, r and nw.
    BK: tl.constexpr = NG * GROUP
    PN = 0
    if SHRINK:
        PN = tl.cdiv(LSR, SPLIT)  # grid columns of shrink programs
    pid_n, pid_k, k_lo, k_hi, offs_n, row_ok = _program_slice(K_PER, K, N, BN, PN, SHRINK,
                                                              PAIR, HALF_N)
    if PDL and L2PRE:  # the first steps' words (frozen weights) into L2 before waiting
        prefetch_first_steps(q_ptr, offs_n, row_ok, stride_q, k_lo, k_hi, BK, STAGES, 8, BK // 2)
    # the first WPRE steps' frozen operands into registers (before the wait, with PDL)
    w0, s0, o0, w1, s1, o1 = preload_steps(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q,
                                           stride_s, k_lo, k_hi, K, FMT, CODE, GROUP,
                                           HAS_OFFSET, NG, WPRE)
    pdl_enter(PDL)
    inv = 0.0
    if PRENORM:  # (never with SHRINK: the launch refuses a LoRA epilogue with a prologue)
        inv = prenorm_inv(x_ptr, r_ptr, ns_ptr, stride_xm, M, K, eps,
                          (tl.program_id(0) == 0) & (pid_k == 0), MP, NB)
    if shrink_program(PN, SHRINK):
        lora_shrink_role(tl.program_id(0) * SPLIT + pid_k, x_ptr, stride_xm, M, K, a0, a1, a2,
                         h_ptr, stride_hm, hc_ptr, LR, LSR, LORA, MP, SBK)
    else:
        plane_tile(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, SPLIT,
                     stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym, h_ptr, b0,
                     b1, b2, LN0, LN1, LR, lscale, stride_hm, hc_ptr, LSR, HALF_N, pid_n, pid_k,
                     k_lo, k_hi, offs_n, row_ok, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT,
                     eps, FMT, CODE, GROUP, HAS_OFFSET, MP, BN, NG, STAGES, FIXUP, DEFER, ASM,
                     XPRE, LORA, LRP, SHRINK, PAIR, NORM, NB, w0, s0, o0, w1, s1, o1, WPRE,
                     inv, PRENORM)


@triton.jit
def plane_tile(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, SPLIT,
                 stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym, h_ptr, b0, b1,
                 b2, LN0, LN1, LR, lscale, stride_hm, hc_ptr, LSR, HALF_N, pid_n, pid_k, k_lo,
                 k_hi, offs_n, row_ok, r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps,
                 FMT: tl.constexpr, CODE: tl.constexpr,
                 GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, MP: tl.constexpr,
                 BN: tl.constexpr, NG: tl.constexpr, STAGES: tl.constexpr, FIXUP: tl.constexpr,
                 DEFER: tl.constexpr, ASM: tl.constexpr, XPRE: tl.constexpr,
                 LORA: tl.constexpr, LRP: tl.constexpr, SHRINK: tl.constexpr,
                 PAIR: tl.constexpr, NORM: tl.constexpr, NB: tl.constexpr, w0=0, s0=0.0,
                 o0=0.0, w1=0, s1=0.0, o1=0.0, WPRE: tl.constexpr = 0, inv=0.0,
                 PRENORM: tl.constexpr = False):
    """The column-tile program of _gemv_planes_kernel (after the PDL wait). WPRE (0..2): the
    first WPRE steps' plane_loads were made by the caller, before its PDL wait (w0, s0, o0
    and w1, s1, o1; a step past k_hi loaded nothing: its words are masked to 0). PRENORM:
    x_ptr is a delta and x = rmsnorm(x + r_ptr) * nw_ptr, with inv from the caller
    (orbit/kernels/norm_prologue.py). The group scales are 2-byte loads (1-byte for FP4),
    too small for the cp.async pipeline that carries the words, so each step loads its own
    scales within its iteration (carrying them in the pipeline as int32 words, or one step
    ahead in registers, measured slower: docs/rollout.md)."""
    WG: tl.constexpr = GROUP // 8
    BK: tl.constexpr = NG * GROUP
    am = tl.arange(0, MP)
    lora_d = _lora_d(offs_n, am, M, N, h_ptr, b0, b1, b2, LN0, LN1, LR, lscale, stride_hm,
                     y_ptr.dtype.element_ty, LORA, LRP, SHRINK)
    n_groups = K // GROUP
    acc = tl.zeros((BN, MP), dtype=tl.float32)
    acc4 = tl.zeros((BN, MP, NG, WG), dtype=tl.float32)
    if XPRE:  # x of the first step; each step then loads the next step's (see XPRE above)
        x_nxt = _x_planes(x_ptr, k_lo, k_hi, stride_xm, M, GROUP, NG, WG, MP, r_ptr,
                          nw_ptr, inv, PRENORM)
    k_start = k_lo
    for j in tl.static_range(WPRE):  # the preloaded steps (see WPRE above)
        k0 = k_lo + j * BK
        if XPRE:
            x_cur = x_nxt
            x_nxt = _x_planes(x_ptr, k0 + BK, k_hi, stride_xm, M, GROUP, NG, WG, MP,
                              r_ptr, nw_ptr, inv, PRENORM)
        else:
            x_cur = _x_planes(x_ptr, k0, k_hi, stride_xm, M, GROUP, NG, WG, MP, r_ptr,
                              nw_ptr, inv, PRENORM)
        if j == 0:
            cx, xs = _plane_products(w0, x_cur, CODE, HAS_OFFSET, MP, BN, NG, WG, DEFER, ASM)
            acc, acc4 = _plane_accumulate(cx, xs, s0, o0, acc, acc4, HAS_OFFSET, DEFER)
        else:
            cx, xs = _plane_products(w1, x_cur, CODE, HAS_OFFSET, MP, BN, NG, WG, DEFER, ASM)
            acc, acc4 = _plane_accumulate(cx, xs, s1, o1, acc, acc4, HAS_OFFSET, DEFER)
        k_start = k0 + BK
    for k0 in tl.range(k_start, k_hi, BK, num_stages=STAGES):
        # (in the order of the loop before the preload existed: words, x, products, then the
        # scales, so that without a preload the kernel is the one measured)
        words = _plane_words(q_ptr, offs_n, row_ok, stride_q, k0, k_hi, GROUP, NG, WG)
        if XPRE:
            x_cur = x_nxt
            x_nxt = _x_planes(x_ptr, k0 + BK, k_hi, stride_xm, M, GROUP, NG, WG, MP,
                              r_ptr, nw_ptr, inv, PRENORM)
        else:
            x_cur = _x_planes(x_ptr, k0, k_hi, stride_xm, M, GROUP, NG, WG, MP, r_ptr,
                              nw_ptr, inv, PRENORM)
        cx, xs = _plane_products(words, x_cur, CODE, HAS_OFFSET, MP, BN, NG, WG, DEFER, ASM)
        sc, off = _plane_scales(s_ptr, o_ptr, offs_n, row_ok, stride_s, k0, n_groups, FMT, CODE,
                                GROUP, HAS_OFFSET, NG)
        acc, acc4 = _plane_accumulate(cx, xs, sc, off, acc, acc4, HAS_OFFSET, DEFER)
    if DEFER:
        acc = tl.sum(tl.sum(acc4, axis=3), axis=2)
    if FMT == 3:
        acc = acc * tl.load(g_ptr).to(tl.float32)
    _store_out(acc, out_ptr, y_ptr, cnt_ptr, pid_n, pid_k, SPLIT, M, N, offs_n, am,
               stride_om, stride_os, stride_ym, FIXUP, lora_d, h_ptr, b0, b1, b2, LN0, LN1, LR,
               lscale, stride_hm, hc_ptr, LSR, LORA, LRP, SHRINK, PAIR, HALF_N, ASM, r_ptr,
               nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT, eps, NORM, NB)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, y_ptr, MN, N, SPLIT, stride_ym, BLOCK: tl.constexpr):
    # y[m, n] = sum_s ws[s, m, n], s = 0, 1, ... in order (deterministic), cast to y's dtype.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + (offs // N) * stride_ym + offs % N, acc.to(y_ptr.dtype.element_ty),
             mask=mask)


ARRIVAL_COUNTERS = 1 << 16  # column tiles one split-K launch may have (n <= 2^16 * block_n)


class ArrivalCounters:
    """Zeroed int32 arrival counters for the in-kernel split-K fix-up, one buffer per (device,
    stream). Every launch leaves its counters at 0 again, so launches in stream order share a
    buffer; launches on different streams could overlap, so each stream gets its own. A
    buffer first made during CUDA-graph capture is zeroed by the capture and kept alive here,
    so graph replays and later eager launches on that stream find it."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], Tensor] = {}

    def get(self, device: torch.device, tiles: int) -> Tensor:
        if tiles > ARRIVAL_COUNTERS - 3:  # (the last three: norm_counter, lora_counters)
            raise ValueError(f"split-K GEMV with {tiles} column tiles; at most "
                             f"{ARRIVAL_COUNTERS - 3}")
        if device.type != "cuda":  # the interpreter runs programs one after another
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        key = (device.index if device.index is not None else torch.cuda.current_device(),
               torch.cuda.current_stream(device).cuda_stream)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=device)
        return buf


_COUNTERS = ArrivalCounters()  # process-wide on purpose: counters are per device and stream


def arrival_counters(device: torch.device, tiles: int) -> Tensor:
    """The arrival-counter buffer for a split-K launch of `tiles` column tiles on `device`."""
    return _COUNTERS.get(device, tiles)


def shrinks_in_kernel(m: int, fmt: str) -> bool:
    """Whether the decode GEMV of an M-row `fmt` forward computes a LoRA epilogue's h in its
    own grid (the plane and FP8 kernels; the tile kernel takes h from a shrink launch)."""
    return fmt in PLANE_FORMATS or (fmt == "fp8" and m <= FP8_GEMV_MAX_M)


def lora_counters(device: torch.device) -> Tensor:
    """Two zeroed int32 counters for a GEMV that computes its LoRA h itself (lora_epilogue:
    shrink programs done, tiles that read h), which the launch leaves zeroed: the last two
    entries of the stream's arrival-counter buffer on CUDA, fresh zeros elsewhere."""
    if device.type != "cuda":
        return torch.zeros(2, dtype=torch.int32, device=device)
    return _COUNTERS.get(device, 1)[ARRIVAL_COUNTERS - 2:]


def norm_counter(device: torch.device) -> Tensor:
    """One zeroed int32 counter for a GEMV with a folded norm (norm_epilogue: column tiles
    done), which the launch leaves zeroed: entry -3 of the stream's buffer on CUDA."""
    if device.type != "cuda":
        return torch.zeros(1, dtype=torch.int32, device=device)
    return _COUNTERS.get(device, 1)[ARRIVAL_COUNTERS - 3:ARRIVAL_COUNTERS - 2]


def lora_launch(lora: LoRAEpilogue | None, x: Tensor, y: Tensor, grid: tuple, split: int,
                in_kernel: bool, n: int | None = None) -> tuple[tuple, dict, tuple]:
    """(LoRA kernel args, constexprs, grid) of a GEMV launch: with A given and `in_kernel`
    (the plane and FP8 GEMVs), the grid grows by the shrink programs' columns; with A given
    otherwise, the shrink runs as its own launch first. `n`: weight rows (kernel_args)."""
    shrink = lora is not None and lora.a is not None
    if shrink and not in_kernel:
        from orbit.kernels.lora_decode import lora_shrink  # (lora_decode imports this module)

        lora.check(y, x, n)
        lora_shrink(x, list(lora.a), out=lora.h)
        shrink = False
    cnt = lora_counters(x.device) if shrink else None
    args, const = kernel_args(lora, x, y, cnt, shrink, n)
    if shrink:
        sr = len(lora.b) * lora.b[0].shape[1]
        grid = (grid[0] + triton.cdiv(sr, split), grid[1])
    return args, const, grid


def _as_words(q: Tensor) -> Tensor | None:
    """A packed 4-bit weight as int32 words [out, in/8] (FP4 bytes are reinterpreted, not
    copied), or None where the bytes cannot be viewed so (odd strides or offset)."""
    if q.dtype == torch.int32:
        return q
    if (q.dtype != torch.uint8 or q.stride(-1) != 1 or q.shape[-1] % 4 or q.stride(0) % 4
            or q.storage_offset() % 4):
        return None
    return q.view(torch.int32)


def gemv(x: Tensor, fmt: str, shape: tuple[int, int], q: Tensor, s: Tensor,
         offset: Tensor | None, global_scale: Tensor | None, group: int, y: Tensor,
         config: object | None = None, lora: LoRAEpilogue | None = None,
         swiglu: bool = False, norm: NormEpilogue | NormPrologue | None = None) -> Tensor:
    """y[M, out] = x[M, in] @ W^T for already-validated tensors (as `_qgemm.launch` gets them)
    and 1 <= M <= 16; `config` overrides the heuristic (bench sweeps): a GemvConfig, or for
    FP8 at M <= FP8_GEMV_MAX_M a gemv_fp8.Fp8GemvConfig. `lora`: add a LoRA delta in the store
    (orbit/kernels/lora_epilogue.py). `swiglu` (the plane kernel; W the stacked gate/up weight,
    gate rows first): y [M, out / 2] = silu(gate) * up, stored by the tiles themselves
    (_program_slice / _store_pair, PAIR). `norm`: after y, the residual add + RMSNorm of
    the next layer input, by the launch's last program (orbit/kernels/norm_epilogue.py); a
    NormPrologue instead: x is a delta, and the GEMV's input is the residual add + RMSNorm
    that each program computes itself (orbit/kernels/norm_prologue.py; the plane kernel, no
    LoRA epilogue)."""
    n, k = shape
    m = x.shape[0]
    assert 1 <= m <= 16 and fmt in FMT_IDS and fmt != "bf16", (m, fmt)
    pre = norm if isinstance(norm, NormPrologue) else None
    if pre is not None:
        norm = None
        if (fmt not in PLANE_FORMATS or lora is not None
                or (config is not None and not config.planes)):
            raise ValueError(f"gemv(norm=NormPrologue): the nibble-plane kernel (int4/nvfp4/"
                             f"mxfp4) without a LoRA epilogue only; got {fmt} (LoRA: "
                             f"{lora is not None})")
    if swiglu and (fmt not in PLANE_FORMATS or n % 2 or (config is not None
                                                         and not config.planes)
                   or norm is not None):
        raise ValueError(f"gemv(swiglu=True) takes no norm epilogue and needs the nibble-plane "
                         f"kernel (int4/nvfp4/mxfp4) and an even number of rows; got {fmt} with "
                         f"{n} rows (norm: {norm is not None})")
    if fmt == "fp8" and m <= FP8_GEMV_MAX_M and not isinstance(config, GemvConfig):
        from orbit.kernels.gemv_fp8 import gemv_fp8  # (gemv_fp8 imports this module)

        return gemv_fp8(x, q, s, y, config, lora, norm)  # type: ignore[arg-type]
    cfg = config or pick_gemv_config(m, n, k, fmt, num_sms(x.device))
    words = _as_words(q) if (cfg.planes and fmt in PLANE_FORMATS) else None
    # The plane kernel steps whole groups: block_k is at least one group.
    block_k = max(cfg.block_k, group) if words is not None else cfg.block_k
    mp = triton.next_power_of_2(m)
    if (swiglu or pre is not None) and words is None:
        raise ValueError("gemv(swiglu=True / a norm prologue): the packed weight cannot be "
                         "viewed as int32 words")
    grid, k_per, split, out, stride_om, stride_os, cnt, fixup = split_k_launch(
        x, y, n, k, cfg.block_n, block_k, cfg.split,
        cfg.fixup or lora is not None or swiglu or norm is not None)
    cnt = cnt if cnt is not None else s
    if pre is not None:
        nargs, nconst = prologue_kernel_args(pre, x, cnt)
    else:
        nargs, nconst = norm_kernel_args(norm, y, grid[0], norm_counter(x.device) if norm else cnt)
    o = offset if offset is not None else s
    # PDL when the config asks (bench) or inside the engine's pdl_scope (grid-size rule there)
    pdl = pdl_launch(x.device, grid[0] * grid[1], forced=cfg.pdl)
    gs = global_scale if global_scale is not None else s
    largs, lconst, grid = lora_launch(lora, x, y, grid, split, in_kernel=words is not None, n=n)
    if words is not None:
        code = plane_code(fmt, offset is not None, cfg.e2m1)
        _gemv_planes_kernel[grid](
            x, out, words, s, o, gs, y, cnt, m, n, k, k_per, split, x.stride(0), stride_om,
            stride_os, words.stride(0), s.stride(0), y.stride(0), *largs, n // 2, *nargs,
            FMT=FMT_IDS[fmt], CODE=code, GROUP=group, HAS_OFFSET=offset is not None, MP=mp,
            BN=cfg.block_n, NG=block_k // group, STAGES=cfg.stages, FIXUP=fixup,
            DEFER=cfg.defer, ASM=x.is_cuda, XPRE=cfg.x_prefetch, L2PRE=cfg.l2_prefetch,
            PAIR=swiglu, WPRE=cfg.w_preload, num_warps=cfg.warps, **lconst, **nconst, **pdl)
    else:
        _gemv_kernel[grid](
            x, out, q, s, o, gs, y, cnt, m, n, k, k_per, split, x.stride(0), stride_om,
            stride_os, q.stride(0), s.stride(0), y.stride(0), *largs, *nargs, FMT=FMT_IDS[fmt],
            GROUP=group, HAS_OFFSET=offset is not None, MP=mp, BN=cfg.block_n, BK=block_k,
            UNPACK=cfg.unpack if cfg.unpack >= 0 else DEFAULT_UNPACK.get(fmt, 0),
            STAGES=cfg.stages, FIXUP=fixup, num_warps=cfg.warps, **lconst, **nconst, **pdl)
    if split > 1 and not fixup:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            out, y, m * n, n, split, y.stride(0), BLOCK=block, num_warps=4)
    return y
