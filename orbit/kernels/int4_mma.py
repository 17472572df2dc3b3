"""INT4 decode GEMM on the tensor cores with register-resident weights (Gluon): `y[M, N] =
x[M, K] @ W^T` for symmetric INT4 codes with bf16 group scales and bf16 x, 1 <= M <= MAX_M.

Why (docs/kernels.md, "INT4 mma.sync with register-fed weights"). The plane GEMV decodes a
weight in 5.5 SASS instructions at M = 1 and 13-17 at M = 4 (each row of x costs its own FMAs),
and Nsight found it bound by that per-warp instruction chain, not by bytes. A tensor-core step
(mma.sync m16n8k16) multiplies 16 x 16 weights by up to 8 rows of x in one instruction, so the
decode is left as the per-weight cost (a shift per nibble pair, a LOP3 that writes the bf16
bits of 128 + u, one packed bf16 FMA to u - 8), the same at every M <= 16: the K loop is 2.8
SASS instructions per weight in all (scripts/bench/sass_int4_mma.py).
Earlier `tl.dot` forms of this idea lost to layout conversions and shared-memory trips that
plain Triton inserts between the loaded words and the MMA operand (sessions 13-16). Gluon names
the layouts: the packed words are loaded straight into the registers where the decoded
weights must sit as the MMA's A operand, and `convert_layout(..., assert_trivial=True)` proves
at compile time that no data moves between threads.

Layout. Swap-AB: out^T[N, M] = W[N, K] @ x^T[K, M], so the weight rows fill the MMA's 16-row
side and the few rows of x its 8-column side (16 from M = 9). The dot only needs W's and x's K
orders to agree, so each thread's K positions are chosen to be bytes it can load in one
vector: with VEC = 4 words (32 weights) a thread loads one 16-byte vector per weight row and
step; word j of a 128-deep step (j = VEC * t + i for lane quad t and register i) is logical K
block i, lane t of the A operand layout (k_width 8: eight K values per thread), and its eight
nibbles, decoded as pairs (p, p + 4), fill that thread's logical K positions 2p and 2p + 1. x is
loaded with the same map (64 contiguous bytes per thread and row of x), so the product is the
plain dot over K in a different order.

Scales. A step is one group (BK = 128 for groups of 128 and more, 64 for 64): the MMA runs on
the raw codes u - 8 (exact in bf16) and the group's fp32 partial is scaled by s once
(`acc += s * partial`), as the plane GEMV does. So the result differs from the dequantized
reference (bf16(s * (u - 8)) @ x) by fp32 rounding only; fast mode's tolerance covers it.

Split-K with the in-kernel fix-up of `gemv.py` (fp32 slices, the last program of a row tile
adds them in slice order: deterministic). Forward only, fast mode only, CUDA sm_80+.

Other forms with the same loop: NVFP4 (`FMT = 3`, routed at 1-32 rows) and FP8 weight-only
(`FMT = 2`: e4m3 bytes decoded to bf16 in registers, 64-deep steps, the 128x128 block scale
on each step's partial; alone slower than the `tl.dot` loop except on deep weights, but in
the engine's PDL chain faster at 2-8 rows on every shape, so routed there: docs/kernels.md
"FP8 form").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from orbit.kernels._qgemm import FMT_IDS
from orbit.kernels._triton import HAS_TRITON
from orbit.kernels.plane_dot import E2M1_PAIR_PTX, U8_PAIR_DECODE_PTX
from orbit.kernels.swiglu import silu_mul_values
from orbit.quant.qweight import FP8_BLOCK, NVFP4_GROUP, QuantizedWeight

try:  # Gluon ships with Triton >= 3.5; CPU installs without Triton have no kernel to run
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

    # the CTA-wide barrier's name: thread_barrier in Triton 3.5-3.6, barrier from 3.7 on
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # cp.async global -> shared: async_copy_global_to_shared in Triton 3.5-3.6, async_load
    # from 3.7 on (the old name then raises)
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # TMA global -> shared: async_copy_global_to_shared in Triton 3.5-3.6, async_load from 3.7
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAS_GLUON = HAS_TRITON
except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton build
    HAS_GLUON = False

# Rows of x the kernel takes: 8 MMA columns up to 8 rows, 16 up to 16, 32 up to 32. The INT4
# and NVFP4 routes (_qgemm.MMA_ROWS) take all 32 (since sessions 31 and 35).
MAX_M = 32
FIXUP_MAX_SPLIT = 16
# pick_config's shallowest K slice a split may leave (session 21's sweeps). 384 gave 6144x2048
# at M = 4 8.6 us (split 16) against 9.3 per GEMM, but the engine's INT4 / NVFP4 decode at
# batch 4-8 within -0.8..+0.9% of 512 (session 24), so 512 stays.
MIN_SLICE_K = 512
# Launch with programmatic dependent launch inside the engine's pdl_scope (orbit/kernels/pdl.py;
# the grid-size rule there), the first steps' weight words and scales loaded before the wait.
# H100, Qwen3-1.7B decode (session 24, `bench_engine.py --knob
# orbit.kernels.int4_mma.USE_PDL=False,True`): INT4 +13% / +15% at batch 4 / 8, NVFP4 +7% to
# +13% at 1-16. The kernel alone is not faster (its grid fills the GPU); what it keeps is the
# programmatic edges of the norm / rope / attention launches around it.
USE_PDL = True
# pick_config's cp.async ring depth (MmaConfig.stages; 0: the register prefetch), clamped to
# the steps of the slice. 0: the ring measured slower at every depth and split (H100, session
# 26: 4096x12288 M = 4 18.0-22.2 us against 17.5; the engine at batch 4-8 -2% to -11%;
# docs/kernels.md "A cp.async ring for the weight words").
RING_STAGES = 0
# pick_config's MmaConfig.l2 (the K slice's weight words bulk-prefetched into L2 up front).
# False: H100, session 27 (`bench_qmm.py --gemv --gemv-mma --gemv-mma-l2`): 4096x12288 slower
# at M = 4 and 16 (17.5 -> 19.8 us, PDL 16.9 -> 19.1), deep 6144x2048 with PDL 6-7% faster
# (M = 4 8.2 -> 7.6 us), 2048x12288 mixed; not a win to route by (no engine run).
L2_SLICE = False
# pick_config's MmaConfig.tma (TMA ring depth; 0: the register prefetch). 0: H100, session 28
# (`bench_qmm.py --gemv --gemv-mma --gemv-mma-tma`): 4096x12288 M = 4 16.6 us plain but 17.9
# with PDL against 17.4 / 16.9; -8-9% on 2048x2048 and 6144x2048; the engine (`--knob
# orbit.kernels.int4_mma.TMA_STAGES=0,2`) INT4 +3% / +2% / -3% at batch 2 / 4 / 8, NVFP4 -2% to
# -9%: no rule yet (docs/kernels.md "A TMA ring for the weight words").
TMA_STAGES = 0
# pick_config's MmaConfig.chains for INT4 groups of 128 and more (1 or 2). 1: H100, session 29
# (`bench_qmm.py --gemv --gemv-mma --gemv-mma-xsmem`, 4096x12288 and 2048x4096 at M = 1, 4,
# 16): two chains were nowhere faster (INT4 M = 4 18.2 / PDL 18.0 us against 17.7 / 17.0;
# M = 16 21.2 / 20.5 against 20.4 / 19.4); no engine run.
MMA_CHAINS = 1
# the same for NVFP4, whose steps accumulate into one chain across the whole K slice (the
# scale is inside the decode): 2 gives two accumulators. 1: the same runs (NVFP4 M = 4 19.7 /
# 19.0 us against 18.8 / 18.1).
NVFP4_MMA_CHAINS = 1
# From how many rows pick_config stages x in shared memory (MmaConfig.x_smem), where the
# program's x slice fits (x_smem_fits). MAX_M + 1 (never): H100, session 29 (`bench_qmm.py
# --gemv --gemv-mma --gemv-mma-xsmem`): 4-10% faster without PDL (INT4 4096x12288 M = 4 16.9
# against 17.7 us, M = 16 18.9 against 20.4; 2048x4096 M = 4 6.5 against 7.2) but not with
# it, which is how the engine launches (M = 4 17.1 against 17.0, M = 16 19.7 against 19.4;
# 2048x4096 M = 4 6.2 against 5.9). The engine run is queued (--knob
# orbit.kernels.int4_mma.X_SMEM_MIN_M=17,1).
X_SMEM_MIN_M = MAX_M + 1
# The most shared memory one program's staged x slice may take (NP rows x K slice x 2 bytes):
# 32 KB is M = 16 at a 1024-deep slice; 3 such programs per SM still fit H100's 228 KB.
X_SMEM_MAX_BYTES = 32 * 1024
# pick_config's MmaConfig.kw: up to this many of the split rule's K parts run as warps along K
# inside one program (summed in shared memory) instead of as programs (summed by the global
# fix-up); a 4-warp program's parts then need no more warps per tile and K part (8 parts: one
# 8-warp program). 8: H100, session 30 (docs/kernels.md "Warps along K"; `bench_engine.py
# --knob orbit.kernels.int4_mma.WARP_K=1,4,2` then `=4,8` then `=8,16`): Qwen3-1.7B decode
# INT4 batch 2 / 4 / 8 +8% / +8% / +11% over 1, NVFP4 batch 1 / 4 / 8 / 16 +8% / +6% / +8% /
# +17%; 16 the same as 8. Isolated (`bench_qmm.py --gemv --gemv-mma --gemv-mma-kw`): INT4
# 4096x12288 M = 16 17.4 us with PDL against the split pick's 19.4, 6144x2048 M = 4 7.1
# against 8.1.
WARP_K = 8
# Up to how many rows (per format) pick_config's warps-along-K form loads two steps of weight
# words and scales ahead (MmaConfig.prefetch 2) instead of one. With warps along K a warp
# streams its K part alone (one warp over N per part at these sizes), so one step ahead left
# each warp too few bytes in flight. INT4 8: H100, session 33 (`bench_qmm.py --gemv --gemv-mma
# --gemv-mma-kw sweep`, PDL): every Qwen3 shape at M = 1, 4, 8 faster, 2048x2048 M = 1 4.4 ->
# 3.1 us, 2048x4096 5.2 -> 4.1, 2048x12288 9.0 -> 7.8, 6144x2048 7.0 -> 6.4, 4096x12288 M = 4
# 17.0 -> 14.4 (2.94x cuBLAS); at 16 rows (two row tiles a warp, twice the registers) 17.4 ->
# 24.3, so not there. NVFP4 8: H100, session 34 (`bench_engine.py --formats nvfp4 --batches
# 1,2,4,8 --new-tokens 512`, two off/on pairs in one process): +6.4% / +5.8% / +4.9% / +8.7%
# at batch 1 / 2 / 4 / 8 in both pairs (session 33's 128-token runs were mixed). FP8 lost
# there (batch 4 2380 / 2413 -> 2312 / 2313 tok/s, batch 8 3542 -> 3465: -2 to -4%), and
# alone its two-step form is the slowest of 1 / 2 / 3 steps, so FP8 keeps 1. A format missing
# here keeps 1.
KW_DEEP_PREFETCH_MAX_M: dict[str, int] = {"int4": 8, "nvfp4": 8}
# How many steps ahead those rows load (MmaConfig.prefetch; the kernel takes up to 3). 2: three
# measured slower (H100, session 33, `--knob ...KW_DEEP_PREFETCH_STEPS=2,3`: INT4 batch 1 944
# -> 862 tok/s, batch 8 5410 -> 5235; 2048x12288 M = 1 7.8 -> 10.2 us alone).
KW_DEEP_PREFETCH_STEPS = 2
# The deep form per format where it is not (KW_DEEP_PREFETCH_STEPS, the kw pick's warps):
# (steps ahead, warps a program; warps over N = warps // kw). FP8 (3, 8): H100, session 35
# (`pending_device_runs.sh f`, PDL), every Qwen3 shape at M = 2-8 fastest with 8-warp programs
# 3 steps ahead (2048x4096 M = 4 7.2 us against the one-step pick's 7.8; 2048x12288 13.5 against
# 15.7; 4096x12288 28.3 against 31.1; 6144x2048, kw 8: 10.8 against 11.8). It applies only where
# KW_DEEP_PREFETCH_MAX_M gives FP8 rows, which waits for an engine run.
KW_DEEP_FORM: dict[str, tuple[int, int]] = {"fp8": (3, 8)}


@dataclass(frozen=True)
class MmaConfig:
    """warps: 16-row MMA tiles side by side (BN = 16 * warps * row_tiles weight rows per
    program); row_tiles: 16-row tiles per warp (x registers are shared between them);
    split: K slices; prefetch: steps whose weight words and scales are loaded ahead of the one
    being computed (0-3); x_prefetch: the next step's x too; pdl: launch with
    programmatic dependent launch even outside the engine's pdl_scope (a benchmark's rows);
    stages: 0 keeps the weight words' prefetch in registers (`prefetch` steps ahead); n > 0
    streams them through a ring of n steps in shared memory with cp.async instead, n steps
    in flight per program without the registers to hold them (scales keep `prefetch`);
    l2: the K slice's words bulk-prefetched into L2 first; tma: n > 0 streams the words
    through a ring of n steps in shared memory filled by TMA (one 2-D bulk copy of the
    program's [BN, step] word tile per step, completion on an mbarrier per slot) instead of
    per-thread loads: the copy engine holds the requests in flight, not the warps' load
    queues, which is what a cp.async ring could not change (sm_90 only); chains: 2 splits
    each step's MMAs into two independent accumulation chains (a thread's first and last
    half of its words): INT4 sums the two partials before the scale, so a step's 8 dependent
    HMMAs become two chains of 4; NVFP4 keeps two accumulators over the whole slice;
    x_smem: the program's whole x slice is loaded once after the PDL wait, by all its
    threads (each element once, 16 bytes a thread), into shared memory in the MMA's K order,
    and each step reads its B operand from there: no per-warp copy of every x tile, no
    per-step repacking of x into the operand's pairs (PRMT), no x registers held across a
    step (x_prefetch then does nothing);
    kw: warps along K inside a program (1, 2, 4 or 8; `warps` of them side by side over N
    for each K part, warps x kw warps in all): the program's K slice is cut into kw parts,
    each warp runs the K loop over its own part of the same weight rows, and the parts'
    accumulators are summed in shared memory at the end (in part order: deterministic).
    A split K without split-K's global fix-up (fp32 slices through L2, an acq_rel atomic,
    the last program's serial read-back); register form only (no ring, TMA, L2 prefetch,
    staged x or second chain)."""

    warps: int = 4
    row_tiles: int = 1
    split: int = 1
    prefetch: int = 1
    x_prefetch: bool = False
    pdl: bool = False
    stages: int = 0
    l2: bool = False
    tma: int = 0
    chains: int = 1
    x_smem: bool = False
    kw: int = 1

    @property
    def block_n(self) -> int:
        return 16 * self.warps * self.row_tiles

    @property
    def num_warps(self) -> int:
        return self.warps * self.kw


FORMATS = ("int4", "nvfp4", "fp8")  # (the kernel's FMT is the format's _qgemm.FMT_IDS)


def supports(m: int, k: int, n: int, group: int, x_dtype: torch.dtype,
             scale_dtype: torch.dtype, has_offset: bool, fmt: str = "int4") -> bool:
    """Whether this kernel computes a forward of these operands: INT4 with symmetric codes and
    bf16 scales in groups of 64 or a multiple of 128, NVFP4 (e4m3 scales per 16), or FP8
    e4m3 with fp32 128x128 block scales (weight-only: bf16 x); bf16 x of 1..MAX_M rows, K a
    multiple of the step depth."""
    if not (HAS_GLUON and 1 <= m <= MAX_M and not has_offset and x_dtype == torch.bfloat16):
        return False
    if fmt == "nvfp4":
        return (group == NVFP4_GROUP and scale_dtype == torch.float8_e4m3fn
                and k % step_depth(fmt, group) == 0)
    if fmt == "fp8":
        return (group == FP8_BLOCK and scale_dtype == torch.float32
                and k % step_depth(fmt, group) == 0)
    return (fmt == "int4" and scale_dtype == torch.bfloat16 and _vec(group) > 0
            and k % group == 0)


def _vec(group: int, fmt: str = "int4") -> int:
    # per-thread words of one weight row per step: one 16-byte load (NVFP4, FP8, INT4 groups
    # of 128 and more) or one 8-byte load (INT4 groups of 64); 0: groups the kernel does not
    # take
    if fmt in ("nvfp4", "fp8") or group % 128 == 0:
        return 4
    return 2 if group == 64 else 0


def k_per_word(fmt: str) -> int:
    """Weights per 32-bit word: 8 codes of 4 bits, 4 of FP8's 8."""
    return 4 if fmt == "fp8" else 8


def step_depth(fmt: str, group: int) -> int:
    """K per step (4 lane quads x VEC words): 128, 64 for INT4 groups of 64 (a step never
    spans two INT4 groups) and for FP8 (16 bytes per thread and row: half a scale block)."""
    return 4 * k_per_word(fmt) * _vec(group, fmt)


def pick_config(m: int, k: int, n: int, group: int, sms: int, fmt: str = "int4",
                warp_k: int | None = None) -> MmaConfig:
    """The config of an M-row forward, from the H100 sweeps of session 21 (docs/kernels.md;
    `bench_qmm.py --gemv --gemv-mma --gemv-mma-sweep`) on four Qwen3 shapes: one step of
    words and scales loaded ahead (two were within noise, and cost registers); from 9 rows
    on, two 16-row tiles per warp (the 16-column x is shared by both) and x loaded a step
    ahead too; the largest split of K (a power of two up to 16) that keeps at most 6
    programs' worth of 16-row tiles per SM and slices at least 512 deep: the kernel is bound
    by each warp's load-to-MMA latency chain (Nsight: long-scoreboard stalls), so more,
    shorter chains help until the fix-up and the per-program set-up cost more. NVFP4 takes
    the INT4 rule: its own sweep (session 22) put it within 0-7% of the best config on every
    shape. Then (session 30) up to `warp_k` (default WARP_K) of the split's K parts run as
    warps along K inside one program (MmaConfig.kw) instead of as programs: the same warps
    per tile and K part, no global fix-up; warp_k = 1 gives the split-K pick."""

    # (past 16 rows one row tile and no x prefetch: a step's 32-column x tile alone is 64
    # registers a thread)
    rt = 2 if 8 < m <= 16 else 1
    cfg = MmaConfig(warps=4, row_tiles=rt, prefetch=1, x_prefetch=8 < m <= 16)
    tiles = -(-n // cfg.block_n)
    steps = k // step_depth(fmt, group)
    split = 1
    while (split * 2 <= min(FIXUP_MAX_SPLIT, steps // 2) and steps % (split * 2) == 0
           and tiles * split * 2 * rt <= 6 * sms and k // (split * 2) >= MIN_SLICE_K):
        split *= 2
    chains = NVFP4_MMA_CHAINS if fmt == "nvfp4" else MMA_CHAINS if fmt == "int4" else 1
    chains = chains if chains_fit(fmt, group, chains) else 1
    cfg = dataclasses.replace(cfg, split=split, stages=min(RING_STAGES, steps // split),
                              l2=L2_SLICE, tma=min(TMA_STAGES, steps // split), chains=chains,
                              x_smem=m >= X_SMEM_MIN_M and x_smem_fits(m, k // split))
    kw = min(WARP_K if warp_k is None else warp_k, split)
    if kw > 1:  # the split's K parts as warps along K
        by_warps = warps_along_k(cfg, kw, split // kw)
        if m <= KW_DEEP_PREFETCH_MAX_M.get(fmt, 0):
            steps, warps = KW_DEEP_FORM.get(fmt, (KW_DEEP_PREFETCH_STEPS, by_warps.num_warps))
            by_warps = dataclasses.replace(by_warps, prefetch=steps, warps=max(1, warps // kw))
        if kw_fits(by_warps, k, group, fmt):
            return by_warps
    return cfg


def warps_along_k(cfg: MmaConfig, kw: int, split: int) -> MmaConfig:
    """`cfg` with its K slice cut into `kw` parts run as warps of one program
    (MmaConfig.kw) and `split` programs per row tile: its warps side by side over N divided
    among the parts (at least one), the register form (no ring, TMA, L2 prefetch, staged x
    or second chain). Whether the kernel runs it on a given K: `kw_fits`."""
    return dataclasses.replace(cfg, warps=max(1, cfg.warps // kw), kw=kw, split=split,
                               stages=0, l2=False, tma=0, chains=1, x_smem=False)


def mma_columns(m: int) -> int:
    """The kernel's NP: the MMA's x columns for M = m rows (8, 16 past 8 rows, 32 past 16)."""
    return 8 if m <= 8 else 16 if m <= 16 else 32


def x_smem_bytes(m: int, k_slice: int) -> int:
    """Shared memory of MmaConfig.x_smem's staged x: the MMA's NP columns of a
    `k_slice`-deep slice, bf16."""
    return mma_columns(m) * k_slice * 2


def x_smem_fits(m: int, k_slice: int) -> bool:
    """Whether a program's x slice may be staged: within X_SMEM_MAX_BYTES, and a power of two
    deep (the staging load is one [NP, K slice] tile; Triton's ranges are powers of two)."""
    return (x_smem_bytes(m, k_slice) <= X_SMEM_MAX_BYTES and k_slice > 0
            and k_slice & (k_slice - 1) == 0)


if HAS_GLUON:

    @cache  # (plain ints in, frozen layouts out: built once per config, not per launch)
    def layouts(warps: int, row_tiles: int, np_: int, vec: int, kpw: int = 8):
        """The MMA accumulator layout, its A and B operand layouts and the load layouts whose
        registers are already where the operands need them (docs above), the last one
        NVFP4's scale tile. `kpw`: weights per word (8; FP8 4).
        Word tile [BN, 4 (lane quad t), VEC (register i)]; x tile [NP, 4 (t), KPW VEC],
        4-bit: x[n, k0 + 8 (VEC t + i) + 4 h + p] at [n, t, 8 i + 4 h + p]; FP8:
        x[n, k0 + 4 (VEC t + j) + b] at [n, t, 4 j + b] (b: the byte of word j)."""
        mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1],
                                        instr_shape=[16, 8])
        a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8)
        b = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8)
        wb = [[16 << w, 0, 0] for w in range(warps.bit_length() - 1)]
        # every 3-D load tile: lane quad t on dim 1, the 8 lanes of a quad on dim 0
        lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
        ireg = [[0, 0, 1 << j] for j in range(vec.bit_length() - 1)]
        rreg = [[16 * warps << r, 0, 0] for r in range(row_tiles.bit_length() - 1)]
        lw = gl.DistributedLinearLayout(
            reg_bases=ireg + [[8, 0, 0]] + rreg,
            lane_bases=lanes,
            warp_bases=wb, block_bases=[], shape=[16 * warps * row_tiles, 4, vec])
        # x tile [NP, 4, KPW VEC]: registers c = p (1, 2), h (4), i (8, ...), then n 8
        creg = [[0, 0, 1 << j] for j in range((kpw * vec).bit_length() - 1)]
        lx = gl.DistributedLinearLayout(
            reg_bases=creg + [[8 << j, 0, 0] for j in range((np_ // 8).bit_length() - 1)],
            lane_bases=lanes,
            warp_bases=[[0, 0, 0] for _ in range(warps.bit_length() - 1)], block_bases=[],
            shape=[np_, 4, kpw * vec])
        # NVFP4 scale tile [BN, 4, VEC / 2] (one e4m3 per two words): LW without its lowest
        # register bit, which the join of the scale with itself puts back
        ls = gl.DistributedLinearLayout(
            reg_bases=ireg[:-1] + [[8, 0, 0]] + rreg,
            lane_bases=lanes,
            warp_bases=wb, block_bases=[], shape=[16 * warps * row_tiles, 4, max(1, vec // 2)])
        return mma, a, b, lw, lx, ls

    @cache
    def word_tile_2d(warps: int, row_tiles: int, vec: int):
        """The word tile's layout (`layouts`' LW) flattened to [BN, 4 VEC], word VEC t + i at
        column VEC t + i: how the TMA ring's shared tiles are read back (a reshape to [BN, 4,
        VEC] is then LW with no data movement). Each quad of lanes reads 64 contiguous bytes
        of one row, eight quads eight rows: 512 contiguous bytes of an unswizzled tile per
        warp load, no bank conflicts."""
        wb = [[16 << w, 0] for w in range(warps.bit_length() - 1)]
        lanes = [[0, vec], [0, 2 * vec], [1, 0], [2, 0], [4, 0]]
        ireg = [[0, 1 << j] for j in range(vec.bit_length() - 1)]
        rreg = [[16 * warps << r, 0] for r in range(row_tiles.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg_bases=ireg + [[8, 0]] + rreg, lane_bases=lanes,
                                          warp_bases=wb, block_bases=[],
                                          shape=[16 * warps * row_tiles, 4 * vec])

    @cache
    def x_stage_layouts(warps: int, bk: int, steps: int):
        """MmaConfig.x_smem: the register layout that loads a program's x slice [NP, steps
        BK] at once (8 contiguous bf16, 16 bytes, per thread and piece; each element loaded
        by one thread), and the shared layout of the staged [steps, NP, BK] tile: 16-byte pieces
        swizzled across the 8 rows a B-operand read touches at one K offset (rows are 256 or
        128 bytes apart: the same banks without the swizzle)."""
        tk = min(32, steps * bk // 8)
        load = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // tk, tk],
                                warps_per_cta=[warps, 1], order=[1, 0])
        smem = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
        return load, smem

    # the TMA ring's shared layout: unswizzled rows of the word tile (word_tile_2d's reads are
    # conflict-free without a swizzle)
    TMA_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)

    # $0, $1: u - 8 of nibbles P and P + 4 as bf16 (exact); $2: the word shifted right by 4P
    # (plane_dot's decode, without its scale)
    _U8_PAIR_ASM = gl.constexpr("{\n.reg .b32 t, m, c, one, neg;\n" + U8_PAIR_DECODE_PTX
                                + "mov.b32 {$0, $1}, t;\n}")

    @gluon.jit
    def _pairs_to_a(lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, A: gl.constexpr,
                    BN: gl.constexpr, BK: gl.constexpr):
        # the decoded pairs (nibbles p, p + 4) of words [BN, 4, VEC] -> A operand [BN, BK]:
        # [BN, 4, VEC, h, p0, p1], logical K within the thread's eight is h + 2 p0 + 4 p1
        v = gl.join(gl.join(gl.join(lo0, hi0), gl.join(lo1, hi1)),
                    gl.join(gl.join(lo2, hi2), gl.join(lo3, hi3)))
        v = gl.permute(v, (0, 2, 1, 5, 4, 3))
        return gl.convert_layout(gl.reshape(v, [BN, BK]), A, assert_trivial=True)

    @gluon.jit
    def _u8_pair(t):
        return gl.inline_asm_elementwise(_U8_PAIR_ASM, "=h,=h,r", [t],
                                         dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)

    @gluon.jit
    def _decode(words, A: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
        # words [BN, 4, VEC] int32 -> A operand [BN, BK] bf16 of u - 8, K order as documented
        lo0, hi0 = _u8_pair(words)
        lo1, hi1 = _u8_pair(words >> 4)
        lo2, hi2 = _u8_pair(words >> 8)
        lo3, hi3 = _u8_pair(words >> 12)
        return _pairs_to_a(lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, A, BN, BK)

    # $0, $1 the bf16 weights; $2 the bf16 bits of both nibbles' v * 2^-126; $3 the bf16
    # s' = s * 2^117: one packed FMA gives v * s * 2^-9, exact (plane_dot.py, session 14)
    _E2M1_PAIR_ASM = gl.constexpr(E2M1_PAIR_PTX)
    _E2M1_SCALE = gl.constexpr(2.0 ** 117)
    _SIGNS = gl.constexpr(-2147450880)  # 0x80008000 as an int32

    @gluon.jit
    def _e2m1_pair(mag, sgn, sc16):
        # nibble bits 2..0 (shifted to 8..6) and bit 3 (to 15) of both 16-bit halves
        bits = (mag & 0x01C001C0) | (sgn & _SIGNS)
        return gl.inline_asm_elementwise(_E2M1_PAIR_ASM, "=h,=h,r,h", [bits, sc16],
                                         dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)

    @gluon.jit
    def _decode_e2m1(words, sb, A: gl.constexpr, LW: gl.constexpr, BN: gl.constexpr,
                     BK: gl.constexpr, VEC: gl.constexpr):
        # words [BN, 4, VEC] int32 of E2M1 codes, sb [BN, 4, VEC / 2] e4m3 scales (one per two
        # words) -> A operand [BN, BK] bf16 of v * s * 2^-9, in _decode's K order
        f = (sb.to(gl.float32) * _E2M1_SCALE).to(gl.bfloat16)  # exact: <= 1.75 * 2^125
        sc = gl.convert_layout(gl.reshape(gl.join(f, f), [BN, 4, VEC]), LW,
                               assert_trivial=True)
        lo0, hi0 = _e2m1_pair(words << 6, words << 12, sc)
        lo1, hi1 = _e2m1_pair(words << 2, words << 8, sc)
        lo2, hi2 = _e2m1_pair(words >> 2, words << 4, sc)
        lo3, hi3 = _e2m1_pair(words >> 6, words, sc)
        return _pairs_to_a(lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, A, BN, BK)

    # FP8: $0..$3 the bf16 weights of bytes 0..3 of word $4, exact. Each byte's e4m3 bits go
    # where bf16 keeps them (sign to bit 15, exponent and mantissa to bits 10..4: the value
    # times 2^-120, subnormals included), then one packed FMA by 2^120 (+ -0) gives the value.
    # Odd bytes are already at bits 15..8 of the two halves; even ones are shifted there.
    _E4M3_WORD_ASM = gl.constexpr(
        "{\n.reg .b32 e, o, m, c, z;\n"
        "mov.b32 c, 0x7B807B80;\nmov.b32 z, 0x80008000;\n"
        "and.b32 m, $4, 0x7F007F00;\nshr.b32 m, m, 4;\n"
        "and.b32 o, $4, 0x80008000;\nor.b32 o, o, m;\nfma.rn.bf16x2 o, o, c, z;\n"
        "shl.b32 e, $4, 8;\nand.b32 m, e, 0x7F007F00;\nshr.b32 m, m, 4;\n"
        "and.b32 e, e, 0x80008000;\nor.b32 e, e, m;\nfma.rn.bf16x2 e, e, c, z;\n"
        "mov.b32 {$0, $2}, e;\nmov.b32 {$1, $3}, o;\n}")

    @gluon.jit
    def _decode_e4m3(words, A: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                     VEC: gl.constexpr):
        # words [BN, 4, VEC] int32 of e4m3 bytes -> A operand [BN, BK] bf16 (the raw values;
        # the block scale multiplies the step's fp32 partial). Thread t's word j = 2 i + w
        # holds logical K 32 i + 8 t + 4 w + b for its bytes b: the x tile's order (_to_b8)
        b0, b1, b2, b3 = gl.inline_asm_elementwise(
            _E4M3_WORD_ASM, "=h,=h,=h,=h,r", [words],
            dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        # (a join's new axis goes last, so the inner join's is the earlier one: [.., x, y]
        # for join(join(., .) over x, ...) over y; _pairs_to_a reads it the same way)
        v = gl.join(gl.join(b0, b2), gl.join(b1, b3))  # [BN, 4, VEC, b >> 1, b & 1]
        v = gl.reshape(v, [BN, 4, VEC // 2, 2, 2, 2])
        v = gl.permute(v, (0, 2, 1, 3, 4, 5))
        return gl.convert_layout(gl.reshape(v, [BN, BK]), A, assert_trivial=True)

    @gluon.jit
    def _to_b8(xv, B: gl.constexpr, NP: gl.constexpr, BK: gl.constexpr, VEC: gl.constexpr):
        # FP8's x tile [NP, 4, 4 VEC] -> B operand [BK, NP]: [n, t, i, e] -> [i, t, e, n]
        xr = gl.reshape(xv, [NP, 4, VEC // 2, 8])
        xb = gl.permute(xr, (2, 1, 3, 0))
        return gl.convert_layout(gl.reshape(xb, [BK, NP]), B, assert_trivial=True)

    @gluon.jit
    def _to_b(xv, B: gl.constexpr, NP: gl.constexpr, BK: gl.constexpr, VEC: gl.constexpr):
        # x tile [NP, 4, 8 VEC] -> B operand [BK, NP]: [n, t, i, h, p] -> [i, t, p, h, n], so
        # K = h + 2p + 8t + 32i in the A operand's order (a trivial conversion: registers only)
        xr = gl.reshape(xv, [NP, 4, VEC, 2, 4])
        xb = gl.permute(xr, (2, 1, 4, 3, 0))
        return gl.convert_layout(gl.reshape(xb, [BK, NP]), B, assert_trivial=True)

    @gluon.jit
    def _word_halves(words, LWH: gl.constexpr, BN: gl.constexpr, VEC: gl.constexpr):
        # words [BN, 4, VEC] -> each thread's first and last VEC / 2 words, each in the word
        # layout of VEC / 2 (MmaConfig.chains; the split takes the highest register bit)
        h = gl.permute(gl.reshape(words, [BN, 4, 2, VEC // 2]), (0, 1, 3, 2))
        a, b = gl.split(h)
        return (gl.convert_layout(a, LWH, assert_trivial=True),
                gl.convert_layout(b, LWH, assert_trivial=True))

    @gluon.jit
    def _x_halves(xv, LXH: gl.constexpr, NP: gl.constexpr, VEC: gl.constexpr):
        # x tile [NP, 4, 8 VEC] -> the K positions of _word_halves' two halves, each in the x
        # layout of VEC / 2 (word i holds x[.., 8 i + r])
        h = gl.permute(gl.reshape(xv, [NP, 4, 2, 4 * VEC]), (0, 1, 3, 2))
        a, b = gl.split(h)
        return (gl.convert_layout(a, LXH, assert_trivial=True),
                gl.convert_layout(b, LXH, assert_trivial=True))

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.7 on
        @gluon.jit
        def _as_rows(xs, dtype: gl.constexpr, rows: gl.constexpr, cols: gl.constexpr,
                     layout: gl.constexpr):
            # a shared [steps, NP, BK] tile viewed as [steps NP, BK] rows
            return xs.reinterpret(dtype, [rows, cols], layout)
    else:  # Triton 3.5-3.6: the same view under its older name
        @gluon.jit
        def _as_rows(xs, dtype: gl.constexpr, rows: gl.constexpr, cols: gl.constexpr,
                     layout: gl.constexpr):
            return xs._reinterpret(dtype, [rows, cols], layout)

    @gluon.jit
    def _b_full(cur_x, xsv, XS: gl.constexpr, FMT: gl.constexpr, B: gl.constexpr,
                NP: gl.constexpr, BK: gl.constexpr, VEC: gl.constexpr):
        # a step's B operand [BK, NP]: from the staged x (XS > 0: xsv, that step's [NP, BK]
        # already in the K order) or from the x tile in registers
        if XS > 0:
            xb = xsv.permute((1, 0)).load(B)
        elif FMT == 2:
            xb = _to_b8(cur_x, B, NP, BK, VEC)
        else:
            xb = _to_b(cur_x, B, NP, BK, VEC)
        return xb

    @gluon.jit
    def _b_halves(cur_x, xsv, XS: gl.constexpr, LXH: gl.constexpr, B: gl.constexpr,
                  NP: gl.constexpr, BK: gl.constexpr, VEC: gl.constexpr):
        # MmaConfig.chains: the B operands [BK / 2, NP] of a step's two halves (the staged
        # K order puts the first half of each thread's words in the first BK / 2 columns)
        if XS > 0:
            xb_a = xsv.slice(0, BK // 2, dim=1).permute((1, 0)).load(B)
            xb_b = xsv.slice(BK // 2, BK // 2, dim=1).permute((1, 0)).load(B)
        else:
            x_a, x_b = _x_halves(cur_x, LXH, NP, VEC)
            xb_a = _to_b(x_a, B, NP, BK // 2, VEC // 2)
            xb_b = _to_b(x_b, B, NP, BK // 2, VEC // 2)
        return xb_a, xb_b

    @gluon.jit
    def _virtual_rows(v, WN: gl.constexpr, KW: gl.constexpr):
        # MmaConfig.kw: virtual row v of the MMA tile (16 rows per warp, WN KW warps, then
        # the row tiles) -> (its row within the program's BN, its K part); warp w = p WN + j
        # holds rows of tile column j, K part p
        w = (v // 16) % (WN * KW)
        row = (v // (16 * WN * KW)) * (16 * WN) + (w % WN) * 16 + v % 16
        return row, w // WN

    @gluon.jit
    def _weight_rows(r, pid_n, N, BN: gl.constexpr, SWIGLU: gl.constexpr):
        # program row r (0..BN) -> its weight row. SWIGLU (W the stacked gate/up weight,
        # gate rows [0, N / 2), up rows [N / 2, N)): rows 0-7 of each 16-row MMA tile are 8
        # gate rows and rows 8-15 the matching up rows, so the store can pair them (and an
        # MMA accumulator thread holds rows g and g + 8 of its tile: both of one column's)
        if SWIGLU:
            o = pid_n * (BN // 2) + (r // 16) * 8 + r % 8
            row = o + ((r // 8) % 2) * (N // 2)
        else:
            row = pid_n * BN + r
        return row

    @gluon.jit
    def _rows_of(v, pid_n, N, BN: gl.constexpr, WN: gl.constexpr, KW: gl.constexpr,
                 SWIGLU: gl.constexpr):
        # the MMA tile's row v -> (its weight row, its K part: 0 unless KW > 1), for the
        # word, scale and (NVFP4) per-16 scale pointers alike
        part = 0
        if KW > 1:
            v, part = _virtual_rows(v, WN, KW)
        return _weight_rows(v, pid_n, N, BN, SWIGLU), part

    @gluon.jit
    def _store_swiglu(acc, y_ptr, pid_n, N, M, stride_ym, BN: gl.constexpr, NP: gl.constexpr,
                      LPR: gl.constexpr, LSW: gl.constexpr):
        # acc [BN, NP] in _weight_rows' SWIGLU order -> y[col, pid_n BN / 2 + j] =
        # silu(gate) * up, gate and up each rounded to y's dtype first (what the plain store
        # followed by the silu_mul launch computes: the same silu_mul_values). The split needs
        # each (gate, up) pair in one thread: LPR [tiles, 8, NP, 2] holds it so.
        HB: gl.constexpr = BN // 2
        v = gl.reshape(acc.to(y_ptr.dtype.element_ty), [BN // 16, 2, 8, NP])
        g, u = gl.split(gl.convert_layout(gl.permute(v, (0, 2, 3, 1)), LPR))
        out = gl.convert_layout(silu_mul_values(gl.reshape(g, [HB, NP]), gl.reshape(u, [HB, NP]),
                                                g.dtype, True), LSW)
        rows = gl.expand_dims(pid_n * HB + gl.arange(0, HB, layout=gl.SliceLayout(1, LSW)), 1)
        cols = gl.expand_dims(gl.arange(0, NP, layout=gl.SliceLayout(0, LSW)), 0)
        gl.store(y_ptr + cols * stride_ym + rows, out, mask=(rows < N // 2) & (cols < M))

    @gluon.jit
    def _warp_index():
        # the thread's warp in the program (tid.x / 32, Triton's warp numbering)
        return gl.inline_asm_elementwise(
            "{\n.reg .u32 t;\nmov.u32 t, %tid.x;\nshr.u32 $0, t, 5;\n}", "=r", [],
            dtype=gl.int32, is_pure=True, pack=1)

    @gluon.jit
    def _gdc_wait():
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _prefetch_slice_l2(q_ptr, stride_q, pid_n, pid_k, N, K_SLICE_W, BN: gl.constexpr,
                           LANES: gl.constexpr):
        # MmaConfig.l2: LANES (the program's threads) >= BN rows; PARTS threads per row, each
        # prefetching K_SLICE_W / PARTS words of it (a multiple of 8: 32-byte pieces, 16-byte
        # aligned as the instruction needs; the launch checks the row stride)
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [LANES // 32], [0])
        PARTS: gl.constexpr = LANES // BN
        lane = gl.arange(0, LANES, layout=L1)
        row = gl.minimum(pid_n * BN + lane // PARTS, N - 1)  # (tail rows: row N - 1 again)
        pw = K_SLICE_W // PARTS
        ptr = q_ptr + row * stride_q + (pid_k * K_SLICE_W + (lane % PARTS) * pw)
        nbytes = gl.full([LANES], 0, gl.int32, L1) + pw * 4
        gl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
            [ptr.to(gl.int64, bitcast=True), nbytes], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _pdl_enter(PDL: gl.constexpr):
        # pdl.pdl_enter for Gluon kernels (the same griddepcontrol instructions, which Gluon
        # cannot call as Triton functions): PDL 2 lets the next kernel launch before waiting,
        # PDL 1 (True) waits first
        if PDL == 2:
            _gdc_launch_dependents()
            _gdc_wait()
        elif PDL:
            _gdc_wait()
            _gdc_launch_dependents()

    @gluon.jit
    def _int4_mma_kernel(x_ptr, q_ptr, s_ptr, gs_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                         stride_xm, stride_q, stride_s, stride_ym, K_RUN_W, SPLIT, w_desc,
                         FMT: gl.constexpr, GROUP: gl.constexpr, VEC: gl.constexpr,
                         KPW: gl.constexpr, BN: gl.constexpr,
                         EVEN_N: gl.constexpr, DEPTH: gl.constexpr, XPRE: gl.constexpr,
                         NP: gl.constexpr, MMA: gl.constexpr, A: gl.constexpr,
                         B: gl.constexpr, LW: gl.constexpr, LX: gl.constexpr,
                         LS: gl.constexpr, PDL: gl.constexpr = False,
                         STAGES: gl.constexpr = 0, L2PRE: gl.constexpr = 0,
                         TMA: gl.constexpr = 0, LW2D: gl.constexpr = None,
                         CHAINS: gl.constexpr = 1, LWH: gl.constexpr = None,
                         LXH: gl.constexpr = None, LSH: gl.constexpr = None,
                         XS: gl.constexpr = 0, LXS: gl.constexpr = None,
                         XS_SMEM: gl.constexpr = None, KW: gl.constexpr = 1,
                         WN: gl.constexpr = 4, LOUT: gl.constexpr = None,
                         SWIGLU: gl.constexpr = False, LPR: gl.constexpr = None,
                         LSW: gl.constexpr = None):
        # w_desc: with TMA > 0 the words' TMA descriptor (block [BN, 4 VEC]), else unused.
        # FMT 0: INT4 (u - 8 into the MMA, each step's partial times its group's scale);
        # FMT 2: FP8 (the e4m3 values into the MMA, each step's partial times its block's
        # scale); FMT 3: NVFP4 (v * s * 2^-9 into the MMA, the global scale * 2^9 at the end).
        # KPW: weights per word (8, FP8 4). KW > 1 (MmaConfig.kw): the MMA tile has BN KW
        # "virtual" rows, warp w's rows being weight rows of K part w // WN (_virtual_rows);
        # each warp runs the K loop over K_RUN = K_SLICE / KW of its part. SWIGLU: W is the
        # stacked gate/up weight, y SwiGLU's output [M, N / 2] (_weight_rows, _store_swiglu;
        # one program per tile: SPLIT 1).
        BK: gl.constexpr = 4 * KPW * VEC
        BNV: gl.constexpr = BN * KW
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        # K_RUN_W: a warp's K part in words (the whole slice unless KW > 1), passed as such:
        # a multiple of 16, so the loads vectorize
        K_SLICE_W = K_RUN_W * KW
        K_SLICE = K_SLICE_W * KPW
        K_RUN = K_RUN_W * KPW
        k_lo = pid_k * K_SLICE
        if L2PRE > 0:  # (L2PRE: the program's thread count; frozen weights, before the wait)
            _prefetch_slice_l2(q_ptr, stride_q, pid_n, pid_k, N, K_SLICE_W, BN, L2PRE)

        # word pointers [BN, 4, VEC]: row r, word k0 / 8 + VEC t + i
        LW2: gl.constexpr = gl.SliceLayout(2, LW)
        r, r_part = _rows_of(gl.arange(0, BNV, layout=gl.SliceLayout(1, LW2)), pid_n, N, BN,
                             WN, KW, SWIGLU)
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, LW2))
        i = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        r3 = gl.expand_dims(gl.expand_dims(r, 1), 2)
        w3 = gl.expand_dims(gl.expand_dims(t, 0), 2) * VEC + gl.expand_dims(
            gl.expand_dims(i, 0), 1)
        if not EVEN_N:  # clamp instead of masking: tail rows read row N - 1, never stored
            r3 = gl.minimum(r3, N - 1)
        w_ptrs = q_ptr + r3 * stride_q + (pid_k * K_SLICE_W + w3)
        if KW > 1:
            w_ptrs += gl.expand_dims(gl.expand_dims(r_part * K_RUN_W, 1), 2)

        # x pointers [NP, 4, KPW VEC]: x[n, k0 + KPW VEC t + c], c = 8 i + 4 h + p (4-bit),
        # 4 j + b (FP8) (contiguous)
        LX2: gl.constexpr = gl.SliceLayout(2, LX)
        xn = gl.arange(0, NP, layout=gl.SliceLayout(1, LX2))
        xt = gl.arange(0, 4, layout=gl.SliceLayout(0, LX2))
        xc = gl.arange(0, KPW * VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX)))
        n3 = gl.expand_dims(gl.expand_dims(xn, 1), 2)
        koff = gl.expand_dims(gl.expand_dims(xt, 0), 2) * (KPW * VEC) + gl.expand_dims(
            gl.expand_dims(xc, 0), 1)
        # rows of x past M read row M - 1 (no mask, no zero fill); their columns are not stored
        x_ptrs = x_ptr + gl.minimum(n3, M - 1) * stride_xm + (k_lo + koff)
        if KW > 1:
            # x is replicated over the warps (LX), but each warp needs its own K part's:
            # the part comes from the thread's warp index, which the layout cannot name. No
            # data moves between warps on the way to the B operand (a trivial conversion),
            # so every warp's B registers hold what its own threads loaded. (A scalar to
            # Triton, one per thread in the code, so the x loads keep their 16-byte vectors.)
            x_ptrs += (_warp_index() // WN) * K_RUN

        # scale pointers (a step's scale at + kn // GROUP): INT4 [BN] in the accumulator's
        # row layout; FP8 the same, each row pointing at its 128-row block's scales; NVFP4
        # [BN, 4, VEC / 2], the scale of words 2j and 2j + 1 of the step
        # (KW > 1: each virtual row's scales start at its K part, K_RUN a multiple of GROUP)
        LR: gl.constexpr = gl.SliceLayout(1, MMA)
        rs, rs_part = _rows_of(gl.arange(0, BNV, layout=LR), pid_n, N, BN, WN, KW, SWIGLU)
        if FMT == 3:
            LS2: gl.constexpr = gl.SliceLayout(2, LS)
            sr, sr_part = _rows_of(gl.arange(0, BNV, layout=gl.SliceLayout(1, LS2)), pid_n, N,
                                   BN, WN, KW, SWIGLU)
            sr = gl.minimum(sr, N - 1)
            st = gl.arange(0, 4, layout=gl.SliceLayout(0, LS2))
            sh = gl.arange(0, VEC // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS)))
            s_ptrs = s_ptr + gl.expand_dims(gl.expand_dims(sr, 1), 2) * stride_s + (
                gl.expand_dims(gl.expand_dims(st, 0), 2) * (VEC // 2)
                + gl.expand_dims(gl.expand_dims(sh, 0), 1))
            if KW > 1:
                s_ptrs += gl.expand_dims(gl.expand_dims(sr_part * (K_RUN // GROUP), 1), 2)
        elif FMT == 2:
            s_ptrs = s_ptr + (gl.minimum(rs, N - 1) // GROUP) * stride_s
        else:
            s_ptrs = s_ptr + gl.minimum(rs, N - 1) * stride_s
        if KW > 1 and FMT != 3:
            s_ptrs += rs_part * (K_RUN // GROUP)

        acc = gl.zeros([BNV, NP], gl.float32, MMA)
        zero = gl.zeros([BNV, NP], gl.float32, MMA)
        if FMT == 3 and CHAINS == 2:
            acc_b = gl.zeros([BNV, NP], gl.float32, MMA)
        # DEPTH steps' words and scales are in flight while a step is computed (a scale
        # loaded when used put a DRAM round trip into every step: Nsight, session 21); with
        # XPRE the next step's x too, held as loaded and made the B operand when used. The
        # pointers (kn: the K offset) are the next load's; they stop advancing at the slice's
        # last step, which is then loaded again and not used.
        kn = k_lo
        if DEPTH >= 1:
            if STAGES == 0 and TMA == 0:
                w0 = gl.load(w_ptrs)
            s0 = gl.load(s_ptrs + kn // GROUP)
        if DEPTH >= 2:
            adv0 = gl.where(BK < K_RUN, BK, 0)
            kn += adv0
            if STAGES == 0 and TMA == 0:
                w_ptrs += adv0 // KPW
                w1 = gl.load(w_ptrs)
            s1 = gl.load(s_ptrs + kn // GROUP)
        if DEPTH >= 3:
            adv1 = gl.where(2 * BK < K_RUN, BK, 0)
            kn += adv1
            if STAGES == 0 and TMA == 0:
                w_ptrs += adv1 // KPW
                w2 = gl.load(w_ptrs)
            s2 = gl.load(s_ptrs + kn // GROUP)
        if STAGES > 0:
            # The ring: each thread copies exactly the words it later reads back in LW, so a
            # step needs only its own thread's cp.async group complete. The first STAGES
            # steps are requested now (w_ptrs then points at step STAGES); steps past the
            # slice are not copied (their groups are empty).
            SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                         order=[2, 1, 0])
            ring = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 4, VEC], SMEM)
            for st in gl.static_range(STAGES):
                if st * BK < K_SLICE:
                    _async_load(ring.index(st), w_ptrs)
                async_copy.commit_group()
                w_ptrs += BK // KPW
        if TMA > 0:
            # The TMA ring: slot st holds step st + TMA j on its j-th use (mbarrier phase j & 1);
            # one thread's bulk copy per step, its bytes counted on the slot's barrier. Steps
            # past the slice are not copied (the predicate), nor waited for.
            ring_t = gl.allocate_shared_memory(gl.int32, [TMA, BN, 4 * VEC], w_desc.layout)
            bars = gl.allocate_shared_memory(gl.int64, [TMA, 1], mbarrier.MBarrierLayout())
            for st in gl.static_range(TMA):
                mbarrier.init(bars.index(st), count=1)
            fence_async_shared()  # (the inits visible to the copy engine before its arrivals)
            for st in gl.static_range(TMA):
                ok = st * BK < K_SLICE
                mbarrier.expect(bars.index(st), BN * 16 * VEC, pred=ok)
                _tma_load(w_desc, [pid_n * BN, pid_k * K_SLICE_W + st * (BK // KPW)],
                          bars.index(st), ring_t.index(st), pred=ok)
        # With PDL the loads above (frozen weights and scales: no kernel writes them) are in
        # flight while the previous kernel finishes; x, the workspace and the counters are
        # touched only after the wait.
        _pdl_enter(PDL)
        if XS > 0:
            # MmaConfig.x_smem: the slice's x [NP, XS BK] in one load (each element once),
            # each step's BK columns put in the MMA's K order (_to_b / _to_b8: 4-bit formats
            # [t, i, h, p] -> [i, t, p, h], FP8 [t, i, e] -> [i, t, e]; registers only) and
            # stored in one go as xs[step] = [NP, BK]. (A store per step made the compiler
            # put a CTA barrier after each one, which serialized the steps' loads.)
            XI: gl.constexpr = KPW * VEC // 8
            sn = gl.minimum(gl.arange(0, NP, layout=gl.SliceLayout(1, LXS)), M - 1)
            sk = gl.arange(0, XS * BK, layout=gl.SliceLayout(0, LXS))
            xv = gl.load(x_ptr + gl.expand_dims(sn, 1) * stride_xm
                         + (k_lo + gl.expand_dims(sk, 0)))
            if FMT == 2:
                xv = gl.permute(gl.reshape(xv, [NP, XS, 4, XI, 8]), (1, 0, 3, 2, 4))
            else:
                xv = gl.permute(gl.reshape(xv, [NP, XS, 4, XI, 2, 4]), (1, 0, 3, 2, 5, 4))
            xs = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [XS, NP, BK], XS_SMEM)
            # (the same bytes as [XS NP, BK] rows: the swizzle's phase is the row mod 8, and
            # NP is a multiple of 8)
            _as_rows(xs, x_ptr.dtype.element_ty, XS * NP, BK, XS_SMEM).store(
                gl.reshape(xv, [XS * NP, BK]))
            _cta_barrier()  # (every warp reads every thread's pieces)
        if XPRE and XS == 0:
            x0 = gl.load(x_ptrs)
        for kk in range(0, K_RUN, BK):
            if XS > 0:
                xsv = xs.index(kk // BK)
                cur_x = 0  # (not read: the B operands come from xsv)
            elif XPRE:
                xsv = 0  # (not read)
                cur_x = x0
                x_ptrs += gl.where(kk + BK < K_RUN, BK, 0)
                x0 = gl.load(x_ptrs)
            else:
                xsv = 0
                cur_x = gl.load(x_ptrs)
                x_ptrs += BK
            if STAGES > 0 or TMA > 0:
                if TMA > 0:
                    step = kk // BK
                    slot = step % TMA
                    mbarrier.wait(bars.index(slot), (step // TMA) & 1)
                    cur_w = gl.convert_layout(
                        gl.reshape(ring_t.index(slot).load(LW2D), [BN, 4, VEC]), LW,
                        assert_trivial=True)
                    # every warp has its words of this slot in registers before the slot is
                    # refilled with step + TMA (a generic read, then an async-proxy write)
                    _cta_barrier()
                    fence_async_shared()
                    ok = kk + TMA * BK < K_SLICE
                    mbarrier.expect(bars.index(slot), BN * 16 * VEC, pred=ok)
                    _tma_load(w_desc, [pid_n * BN, pid_k * K_SLICE_W + (step + TMA) * (BK // KPW)],
                              bars.index(slot), ring_t.index(slot), pred=ok)
                else:
                    slot = (kk // BK) % STAGES
                    async_copy.wait_group(STAGES - 1)  # this step's group (the oldest) is done
                    cur_w = ring.index(slot).load(LW)
                if DEPTH == 0:
                    cur_s = gl.load(s_ptrs + (k_lo + kk) // GROUP)
                else:
                    cur_s = s0
                    adv = gl.where(kk + DEPTH * BK < K_RUN, BK, 0)
                    kn += adv
                    if DEPTH >= 3:
                        s0 = s1
                        s1 = s2
                        s2 = gl.load(s_ptrs + kn // GROUP)
                    elif DEPTH == 2:
                        s0 = s1
                        s1 = gl.load(s_ptrs + kn // GROUP)
                    else:
                        s0 = gl.load(s_ptrs + kn // GROUP)
            elif DEPTH == 0:
                cur_w = gl.load(w_ptrs)
                cur_s = gl.load(s_ptrs + (k_lo + kk) // GROUP)
                w_ptrs += BK // KPW
            else:
                cur_w = w0
                cur_s = s0
                adv = gl.where(kk + DEPTH * BK < K_RUN, BK, 0)
                w_ptrs += adv // KPW
                kn += adv
                if DEPTH >= 3:
                    w0 = w1
                    s0 = s1
                    w1 = w2
                    s1 = s2
                    w2 = gl.load(w_ptrs)
                    s2 = gl.load(s_ptrs + kn // GROUP)
                elif DEPTH == 2:
                    w0 = w1
                    s0 = s1
                    w1 = gl.load(w_ptrs)
                    s1 = gl.load(s_ptrs + kn // GROUP)
                else:
                    w0 = gl.load(w_ptrs)
                    s0 = gl.load(s_ptrs + kn // GROUP)
            if FMT == 3 and CHAINS == 2:
                # two accumulators, each one chain across the steps (one chain of every
                # step's 8 HMMAs otherwise): words 0-1 of each thread (scale 0) and 2-3 (1)
                w_a, w_b = _word_halves(cur_w, LWH, BNV, VEC)
                xb_a, xb_b = _b_halves(cur_x, xsv, XS, LXH, B, NP, BK, VEC)
                s_a, s_b = gl.split(cur_s)
                s_a = gl.convert_layout(gl.expand_dims(s_a, 2), LSH, assert_trivial=True)
                s_b = gl.convert_layout(gl.expand_dims(s_b, 2), LSH, assert_trivial=True)
                acc = mma_v2(_decode_e2m1(w_a, s_a, A, LWH, BNV, BK // 2, VEC // 2), xb_a, acc)
                acc_b = mma_v2(_decode_e2m1(w_b, s_b, A, LWH, BNV, BK // 2, VEC // 2), xb_b,
                               acc_b)
            elif FMT == 3:
                a = _decode_e2m1(cur_w, cur_s, A, LW, BNV, BK, VEC)
                acc = mma_v2(a, _b_full(cur_x, xsv, XS, FMT, B, NP, BK, VEC), acc)
            else:  # INT4, FP8: the raw values into the MMA, the partial times the scale
                if FMT == 2:
                    a = _decode_e4m3(cur_w, A, BNV, BK, VEC)
                    part = mma_v2(a, _b_full(cur_x, xsv, XS, FMT, B, NP, BK, VEC), zero)
                elif CHAINS == 2:
                    # two independent MMA chains of half a step each, summed after (fp32
                    # sums in another order)
                    w_a, w_b = _word_halves(cur_w, LWH, BNV, VEC)
                    xb_a, xb_b = _b_halves(cur_x, xsv, XS, LXH, B, NP, BK, VEC)
                    p_a = mma_v2(_decode(w_a, A, BNV, BK // 2), xb_a, zero)
                    p_b = mma_v2(_decode(w_b, A, BNV, BK // 2), xb_b, zero)
                    part = p_a + p_b
                else:
                    a = _decode(cur_w, A, BNV, BK)
                    part = mma_v2(a, _b_full(cur_x, xsv, XS, FMT, B, NP, BK, VEC), zero)
                acc = acc + part * gl.expand_dims(cur_s.to(gl.float32), 1)
            if STAGES > 0:  # refill the slot just read with step kk / BK + STAGES
                if kk + STAGES * BK < K_SLICE:
                    _async_load(ring.index(slot), w_ptrs)
                async_copy.commit_group()
                w_ptrs += BK // KPW
        if STAGES > 0:
            async_copy.wait_group(0)  # (no copy may land in shared memory after the exit)
        if TMA > 0:
            for st in gl.static_range(TMA):
                mbarrier.invalidate(bars.index(st))
        if FMT == 3:
            if CHAINS == 2:
                acc = acc + acc_b
            acc = acc * (gl.load(gs_ptr) * 512.0)

        # out^T: y[col, row] = acc[row, col]
        if KW > 1:
            # the K parts' partials of each row, summed in part order: virtual row
            # (row tile u, part p, 16 WN rows) -> [RT, KW, 16 WN] (_virtual_rows)
            RT: gl.constexpr = BN // (16 * WN)
            acc = gl.sum(gl.reshape(acc, [RT, KW, 16 * WN, NP]), axis=1)
            acc = gl.convert_layout(gl.reshape(acc, [BN, NP]), LOUT)
        if SWIGLU:  # (its own output rows: SwiGLU's [M, N / 2])
            _store_swiglu(acc, y_ptr, pid_n, N, M, stride_ym, BN, NP, LPR, LSW)
        else:
            if KW > 1:
                rs = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LOUT))
                cols = gl.arange(0, NP, layout=gl.SliceLayout(0, LOUT))
            else:
                cols = gl.arange(0, NP, layout=gl.SliceLayout(0, MMA))
            rows2 = gl.expand_dims(rs, 1)
            cols2 = gl.expand_dims(cols, 0)
            omask = (rows2 < N) & (cols2 < M)
            if SPLIT == 1:
                gl.store(y_ptr + cols2 * stride_ym + rows2, acc.to(y_ptr.dtype.element_ty),
                         mask=omask)
            else:
                MN = M * N
                gl.store(ws_ptr + pid_k * MN + cols2 * N + rows2, acc, mask=omask)
                _cta_barrier()
                arrived = gl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
                if arrived == SPLIT - 1:
                    total = gl.zeros_like(acc)
                    for s in range(SPLIT):
                        total += gl.load(ws_ptr + s * MN + cols2 * N + rows2, mask=omask,
                                         other=0.0, cache_modifier=".cg")
                    gl.store(y_ptr + cols2 * stride_ym + rows2,
                             total.to(y_ptr.dtype.element_ty), mask=omask)
                    gl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


def int4_mma(x: Tensor, qweight: Tensor, scale: Tensor, group: int,
             cfg: MmaConfig | None = None, out: Tensor | None = None, fmt: str = "int4",
             global_scale: Tensor | None = None, swiglu: bool = False) -> Tensor:
    """y = x @ W^T for W [N, K]: INT4 in compressed-tensors pack-quantized words `qweight`
    [N, K/8] (int32, LSB-first nibbles, symmetric codes) with bf16 `scale` [N, K/group]; or
    (fmt "nvfp4") E2M1 codes `qweight` [N, K/2] uint8 with e4m3 `scale` [N, K/16] and the fp32
    `global_scale`; or (fmt "fp8") the e4m3 weight `qweight` [N, K] with its fp32 block
    scales `scale` [N/128, K/128] (DeepSeek-V3's scale_inv, group 128; weight-only).
    x [M, K] bf16, M <= MAX_M, into `out` [M, N] (x's dtype) when given. Fast mode (fp32 sums in
    a different order from the reference). `swiglu`: W is the stacked gate/up weight (gate
    rows first, N even) and the result SwiGLU's output silu(x W_gate^T) * (x W_up^T) [M, N / 2],
    bit for bit this launch without it followed by swiglu.silu_mul; one program per tile
    (`swiglu_fits`)."""
    from orbit.kernels.gemv import arrival_counters, num_sms
    from orbit.kernels.pdl import pdl_launch

    m, k = x.shape
    n = qweight.shape[0]
    if not supports(m, k, n, group, x.dtype, scale.dtype, False, fmt):
        raise ValueError(f"int4_mma: unsupported operands ({fmt}, M={m}, K={k}, group={group}, "
                         f"x {x.dtype}, scale {scale.dtype}); see int4_mma.supports")
    if fmt == "nvfp4":
        if qweight.shape != (n, k // 2) or qweight.dtype != torch.uint8:
            raise ValueError(f"int4_mma: NVFP4 qweight must be uint8 [N, K/2] = [{n}, {k // 2}], "
                             f"got {qweight.dtype} {list(qweight.shape)}")
        _check_word_rows(qweight, "NVFP4")
        if global_scale is None or global_scale.numel() != 1:
            raise ValueError("int4_mma: NVFP4 needs its one-element fp32 global_scale")
        qweight = qweight.view(torch.int32)
        gs = global_scale.reshape(1).float()
    elif fmt == "fp8":
        if qweight.shape != (n, k) or qweight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"int4_mma: FP8 qweight must be float8_e4m3fn [N, K] = [{n}, {k}], "
                             f"got {qweight.dtype} {list(qweight.shape)}")
        _check_word_rows(qweight, "FP8")
        if scale.shape != (-(-n // group), -(-k // group)):
            raise ValueError(f"int4_mma: FP8 scale must be [N/{group}, K/{group}] = "
                             f"[{-(-n // group)}, {-(-k // group)}], got {list(scale.shape)}")
        qweight = qweight.view(torch.int32)
        gs = scale
    else:
        if qweight.shape != (n, k // 8) or qweight.dtype != torch.int32:
            raise ValueError(f"int4_mma: qweight must be int32 [N, K/8] = [{n}, {k // 8}], "
                             f"got {qweight.dtype} {list(qweight.shape)}")
        gs = scale
    x = x.contiguous()
    vec = _vec(group, fmt)
    cfg = cfg or pick_config(m, k, n, group, num_sms(x.device), fmt)
    if swiglu and (n % 2 or cfg.split != 1):
        raise ValueError(f"int4_mma: swiglu needs an even N (the stacked gate/up weight; got "
                         f"{n}) and one program per tile (MmaConfig.split 1, got {cfg.split})")
    bk = step_depth(fmt, group)
    if k % (cfg.split * bk):
        raise ValueError(f"int4_mma: K={k} is not a multiple of split {cfg.split} x {bk}")
    kpw = k_per_word(fmt)
    k_slice = k // cfg.split
    n_out = n // 2 if swiglu else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device) if out is None else out
    if y.shape != (m, n_out) or y.dtype != x.dtype or y.stride(1) != 1:
        raise ValueError(f"int4_mma: out must be [{m}, {n_out}] {x.dtype} with unit column "
                         f"stride")
    tiles = -(-n // cfg.block_n)
    _check_kw(cfg, k, group, fmt)
    lanes = 32 * cfg.num_warps
    l2pre = lanes if (cfg.l2 and x.is_cuda and lanes % cfg.block_n == 0
                      and qweight.stride(0) % 4 == 0
                      and (k_slice // kpw) % (8 * lanes // cfg.block_n) == 0) else 0
    if cfg.split > 1:
        ws = torch.empty(cfg.split, m, n, dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, tiles)
    else:
        ws, cnt = y, y
    if cfg.chains != 1 and not chains_fit(fmt, group, cfg.chains):
        raise ValueError(f"int4_mma: chains={cfg.chains} is 1, or 2 for NVFP4 and INT4 "
                         f"groups of 128 and more (got {fmt}, group {group})")
    if cfg.x_smem and not x_smem_fits(m, k_slice):
        raise ValueError(f"int4_mma: MmaConfig.x_smem stages {x_smem_bytes(m, k_slice)} "
                         f"bytes of x per program (M={m}, K slice {k_slice}); it takes "
                         f"a power-of-two slice of at most X_SMEM_MAX_BYTES = "
                         f"{X_SMEM_MAX_BYTES}")
    w_desc = _tma_descriptor(qweight, cfg, vec) if cfg.tma else qweight
    _int4_mma_kernel[(tiles, cfg.split)](
        x, qweight, scale, gs, y, ws, cnt, m, n, k, x.stride(0), qweight.stride(0),
        scale.stride(0), y.stride(0), k_slice // cfg.kw // kpw, cfg.split, w_desc,
        **kernel_constants(cfg, m, group, fmt, n % cfg.block_n == 0, l2pre, k_slice // bk,
                           swiglu),
        num_warps=cfg.num_warps,
        # (USE_PDL off keeps the engine's launches plain; a config's forced PDL still holds)
        **(pdl_launch(x.device, tiles * cfg.split, forced=cfg.pdl)
           if USE_PDL or cfg.pdl else {}))
    return y


def kernel_constants(cfg: MmaConfig, m: int, group: int, fmt: str, even_n: bool,
                     l2pre: int, slice_steps: int = 0, swiglu: bool = False) -> dict:
    """The constexpr arguments of `_int4_mma_kernel` for `cfg` at M = m (the launch's and the
    offline sm_90 compile's, scripts/bench/sass_int4_mma.py): the format's ids, the tile
    sizes and every layout, those of the TMA read-back and the chains' halves included; not
    PDL, which the launch takes from `pdl_launch`. `l2pre`: the L2 slice prefetch's thread
    count (0: none); `slice_steps`: K steps per program (what MmaConfig.x_smem stages);
    `swiglu`: the SwiGLU store (int4_mma's swiglu)."""
    vec, kpw = _vec(group, fmt), k_per_word(fmt)
    np_ = mma_columns(m)
    # (MmaConfig.kw: the MMA tile's rows are the kw K parts' virtual rows, one warp each)
    mma, a, b, lw, lx, ls = layouts(cfg.num_warps, cfg.row_tiles, np_, vec, kpw)
    # the halves of MmaConfig.chains use the word / x / scale layouts of half as many words
    lwh, lxh, lsh = (layouts(cfg.warps, cfg.row_tiles, np_, 2, kpw)[3:6] if cfg.chains == 2
                     else (None, None, None))
    xs = {}
    if cfg.x_smem:
        if slice_steps < 1:
            raise ValueError("int4_mma: MmaConfig.x_smem needs the K steps per program")
        lxs, xs_smem = x_stage_layouts(cfg.warps, 4 * kpw * vec, slice_steps)
        xs = {"XS": slice_steps, "LXS": lxs, "XS_SMEM": xs_smem}
    return {"FMT": FMT_IDS[fmt], "GROUP": group, "VEC": vec, "KPW": kpw, "BN": cfg.block_n,
            "EVEN_N": even_n, "DEPTH": cfg.prefetch, "XPRE": cfg.x_prefetch, "NP": np_,
            "MMA": mma, "A": a, "B": b, "LW": lw, "LX": lx, "LS": ls, "STAGES": cfg.stages,
            "L2PRE": l2pre, "TMA": cfg.tma,
            "LW2D": word_tile_2d(cfg.warps, cfg.row_tiles, vec) if cfg.tma else None,
            "CHAINS": cfg.chains, "LWH": lwh, "LXH": lxh, "LSH": lsh, **xs,
            **({"KW": cfg.kw, "WN": cfg.warps, "LOUT": out_layout(cfg, np_)} if cfg.kw > 1
               else {}),
            **({"SWIGLU": True, **swiglu_layouts(cfg)} if swiglu else {})}


KW_CHOICES = (1, 2, 4, 8)


def kw_fits(cfg: MmaConfig, k: int, group: int, fmt: str = "int4") -> bool:
    """Whether the kernel runs `cfg`'s MmaConfig.kw on K = k: kw in KW_CHOICES; past 1,
    the register form only, and K parts of whole steps that start on a scale group."""
    if cfg.kw == 1:
        return True
    k_slice, bk = k // cfg.split, step_depth(fmt, group)
    return (cfg.kw in KW_CHOICES and not (cfg.stages or cfg.tma or cfg.l2 or cfg.x_smem)
            and cfg.chains == 1 and k % cfg.split == 0 and k_slice % (cfg.kw * bk) == 0
            and (k_slice // cfg.kw) % group == 0)


def _check_kw(cfg: MmaConfig, k: int, group: int, fmt: str) -> None:
    if not kw_fits(cfg, k, group, fmt):
        raise ValueError(f"int4_mma: MmaConfig.kw={cfg.kw} is one of {KW_CHOICES}; past 1 it "
                         f"runs the register form only (no stages, tma, l2, x_smem or second "
                         f"chain) and cuts the K slice ({k} / split {cfg.split}) into parts of "
                         f"whole {step_depth(fmt, group)}-deep steps starting on a group of "
                         f"{group}")


def out_layout(cfg: MmaConfig, np_: int):
    """MmaConfig.kw's layout of the summed [BN, NP] output: lanes down the rows (y's
    contiguous dimension), warps across the columns."""
    tr = min(32, cfg.block_n)
    return gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[tr, 32 // tr],
                            warps_per_cta=[1, cfg.num_warps], order=[0, 1])


def swiglu_layouts(cfg: MmaConfig) -> dict:
    """The SwiGLU store's layouts: LPR of the [tiles, 8, NP, 2] (gate, up) pairs, each pair
    in one thread (what the split takes), and LSW of the [BN / 2, NP] output, lanes down the
    rows (y's contiguous dimension), warps across the columns."""
    tr = min(32, cfg.block_n // 2)
    return {"LPR": gl.BlockedLayout(size_per_thread=[1, 1, 1, 2], threads_per_warp=[1, 8, 4, 1],
                                    warps_per_cta=[cfg.num_warps, 1, 1, 1],
                                    order=[3, 1, 2, 0]),
            "LSW": gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[tr, 32 // tr],
                                    warps_per_cta=[1, cfg.num_warps], order=[0, 1])}


def swiglu_fits(m: int, k: int, n: int, group: int, sms: int, fmt: str = "int4") -> bool:
    """Whether `int4_mma(..., swiglu=True)` runs the stacked gate/up weight [n, k] with its
    picked config: an even n and one program per tile."""
    return n % 2 == 0 and pick_config(m, k, n, group, sms, fmt).split == 1


def chains_fit(fmt: str, group: int, chains: int = 2) -> bool:
    """Whether the kernel has `chains` MMA chains per step for this format and group: 1
    everywhere; 2 for NVFP4 and for INT4 groups of 128 and more (16-byte word steps)."""
    return chains == 1 or (chains == 2 and fmt in ("int4", "nvfp4") and _vec(group, fmt) == 4)


def _tma_descriptor(words: Tensor, cfg: MmaConfig, vec: int):
    """The TMA descriptor of the int32 words [N, K / KPW] with a [BN, 4 VEC] box, for
    MmaConfig.tma; refuses what TMA cannot address. Made per call: the launcher encodes the
    tensor map on the host each launch (a CUDA graph captures it by value, so replays pay
    nothing)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if cfg.stages:
        raise ValueError("int4_mma: MmaConfig.tma and .stages are two rings; pick one")
    if not words.is_cuda or torch.cuda.get_device_capability(words.device)[0] < 9:
        raise ValueError("int4_mma: MmaConfig.tma needs a CUDA device of sm_90 or newer")
    if words.stride(1) != 1 or (words.stride(0) * 4) % 16 or words.data_ptr() % 16:
        raise ValueError(f"int4_mma: TMA needs 16-byte aligned word rows; stride "
                         f"{words.stride()}, address {words.data_ptr():#x}")
    return TensorDescriptor.from_tensor(words, [cfg.block_n, 4 * vec], TMA_SMEM)


def word_rows_aligned(q: Tensor) -> bool:
    """Whether byte codes `q` [N, bytes] can be read as int32 words (NVFP4, FP8): unit-stride
    rows that start on 4-byte boundaries."""
    return not (q.stride(0) % 4 or q.storage_offset() % 4 or q.stride(-1) != 1)


def _check_word_rows(q: Tensor, what: str) -> None:
    if not word_rows_aligned(q):
        raise ValueError(f"int4_mma: {what} qweight rows must be 4-byte aligned (read as int32 "
                         f"words); stride {q.stride()}, offset {q.storage_offset()}")


def weight_operands(qw: QuantizedWeight) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """(codes, scales, group, global scale or None) of an INT4 / NVFP4 / FP8
    `QuantizedWeight`, as `int4_mma` takes them."""
    t = qw.tensors
    if qw.fmt == "nvfp4":
        return t["qweight"], t["scale"], NVFP4_GROUP, t["global_scale"]
    if qw.fmt == "fp8":
        return t["weight"], t["scale_inv"], FP8_BLOCK, None
    return t["qweight"], t["scale"], qw.group_size, None


def int4_mma_weight(x: Tensor, qw: QuantizedWeight, cfg: MmaConfig | None = None,
                    out: Tensor | None = None, swiglu: bool = False) -> Tensor:
    """`int4_mma` on a `QuantizedWeight` (INT4, NVFP4 or FP8)."""
    q, s, group, gs = weight_operands(qw)
    return int4_mma(x, q, s, group, cfg, out, qw.fmt, gs, swiglu)
