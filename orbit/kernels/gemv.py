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
Split-K (SPLIT > 1) when N / BLOCK_N programs would not fill the SMs: each slice writes its
fp32 partial sums to a workspace [SPLIT, M, N] and `_splitk_reduce_kernel` adds the slices in a
fixed order and casts (deterministic, no atomics). Configs come from `pick_gemv_config`, an
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


@dataclass(frozen=True)
class GemvConfig:
    """block_n output columns x block_k reduction per step; split K-slices (1: no workspace)."""

    block_n: int
    block_k: int
    split: int
    warps: int
    stages: int
    unpack: int = -1  # see orbit/kernels/_tiles.py; -1: _qgemm.DEFAULT_UNPACK for the format


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
    deep. The slice depth is rounded so that no slice is empty."""
    mp = triton.next_power_of_2(max(m, 1))
    block_n = GEMV_BLOCK_N_SMALL_M if mp <= 4 else GEMV_BLOCK_N_LARGE_M
    block_k = GEMV_BLOCK_K
    n_tiles = triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    if n_tiles < GEMV_MIN_PROGRAMS_PER_SM * sms:
        want = triton.cdiv(GEMV_TARGET_PROGRAMS_PER_SM * sms, n_tiles)
        most = max(1, k_tiles // GEMV_MIN_K_TILES_PER_SPLIT)
        split = max(1, min(want, most, GEMV_MAX_SPLIT))
        split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # no empty slice
    return GemvConfig(block_n=block_n, block_k=block_k, split=split, warps=GEMV_WARPS,
                      stages=GEMV_STAGES)


@triton.jit
def _gemv_kernel(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, M, N, K, K_PER,
                 stride_xm, stride_om, stride_os, stride_q, stride_s,
                 FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 MP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 UNPACK: tl.constexpr, STAGES: tl.constexpr):
    # out[pid_k, m, n] = sum over this program's K-slice of x[m, k] * W[n, k] (fp32 sums; cast
    # to out's dtype on store: the activation dtype without split, fp32 into the workspace).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BN
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    dt = x_ptr.dtype.element_ty
    offs_k = tl.arange(0, BK)
    cols = tl.arange(0, MP)
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
    offs_n = n0 + tl.arange(0, BN)
    ptrs = out_ptr + pid_k * stride_os + cols[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (cols[None, :] < M))


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


def gemv(x: Tensor, fmt: str, shape: tuple[int, int], q: Tensor, s: Tensor,
         offset: Tensor | None, global_scale: Tensor | None, group: int, y: Tensor,
         config: GemvConfig | None = None) -> Tensor:
    """y[M, out] = x[M, in] @ W^T for already-validated tensors (as `_qgemm.launch` gets them)
    and 1 <= M <= 16; `config` overrides the heuristic (bench sweeps)."""
    n, k = shape
    m = x.shape[0]
    assert 1 <= m <= 16 and fmt in FMT_IDS and fmt != "bf16", (m, fmt)
    cfg = config or pick_gemv_config(m, n, k, fmt, num_sms(x.device))
    mp = triton.next_power_of_2(m)
    k_tiles = triton.cdiv(k, cfg.block_k)
    k_per = triton.cdiv(k_tiles, cfg.split) * cfg.block_k
    split = triton.cdiv(k, k_per)  # slices that hold at least one K tile
    if split > 1:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
        stride_om, stride_os = out.stride(1), out.stride(0)
    else:
        out, stride_om, stride_os = y, y.stride(0), 0
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, out, q, s, offset if offset is not None else s,
        global_scale if global_scale is not None else s,
        m, n, k, k_per, x.stride(0), stride_om, stride_os, q.stride(0), s.stride(0),
        FMT=FMT_IDS[fmt], GROUP=group, HAS_OFFSET=offset is not None, MP=mp,
        BN=cfg.block_n, BK=cfg.block_k,
        UNPACK=cfg.unpack if cfg.unpack >= 0 else DEFAULT_UNPACK.get(fmt, 0),
        STAGES=cfg.stages, num_warps=cfg.warps,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            out, y, m * n, n, split, y.stride(0), BLOCK=block, num_warps=4)
    return y
