"""4-bit GEMM for rollout batch sizes on Hopper's warpgroup MMA (Gluon, sm_90): `y[M, N] =
x[M, K] @ W^T` for bf16 x of up to 256 rows and symmetric INT4 codes with bf16 group scales
(or NVFP4: E2M1 codes, e4m3 scales per 16, an fp32 global scale), routed past int4_mma's 32.

Why (docs/kernels.md, "Rollout rows on wgmma"). From 33 rows fast mode dequantized each INT4
weight into a transient BF16 copy and ran cuBLAS (or the `tl.dot` loop), so a Qwen3-1.7B INT4
base decoded slower than BF16 from batch 64 (H100, session 35: 46.6k against 57.6k tok/s at
256): the dequantize pass writes and cuBLAS re-reads 2 bytes per weight, 4x the bytes the INT4
codes take. The register-fed mma.sync kernel (orbit/kernels/int4_mma.py) stops at 32 rows
(its x lives in registers) and already runs at about cuBLAS speed there: one m16n8k16 per 8
columns of x leaves the tensor cores mostly idle.

Layout. Swap-AB as in int4_mma: out^T[N, M] = W[N, K] @ x^T[K, M]. A warpgroup owns 64 weight
rows (the wgmma's M) and all NP columns of x (its N, up to 256). The weights are decoded
straight into registers in the wgmma's A operand layout (k_width 2: thread (g, t) of a warp
holds rows g, g + 8 and K 2t, 2t + 1, 2t + 8, 2t + 9 of each 16-deep block), so they never
make a shared-memory trip; x arrives by TMA into a ring of shared [NP, 64] tiles (the B
operand, K-major, 128-byte swizzle) with zero rows past M.

Why each thread loads whole rows of words. The A operand's K order is the natural one (wgmma
reads B from shared memory in natural order, so no K permutation can be hidden in x, as
int4_mma does in registers), and a word holds 8 consecutive K: every thread of a lane quad
needs two nibbles of every word of its rows. Each thread loads its rows' 8 words per step
(two 16-byte loads a row, the same addresses across the quad, so DRAM and L2 see each byte
once) and picks its own byte t. Decoding a nibble pair costs 5 instructions (a byte permute,
a multiply that spreads the byte's nibbles to the two halves, the bf16 bits of 128 + u, an
exact packed subtract of 136, a packed multiply by the group scale), 2.5 per weight; at M >= 64 the wgmma needs 64 x M MACs per weight, so there is room for it.

Scales. The weights are scaled before the MMA (bf16(s * (u - 8)), the reference's dequantized
value exactly, since u - 8 is exact and the packed multiply rounds once), so one accumulator
runs across the whole K slice and the wgmma stays asynchronous: one in flight while the next
step decodes.

NVFP4 takes the same loop: the byte spread, then int4_mma's E2M1 decode (each nibble's bits
moved to where bf16 keeps them, one packed FMA by the group's e4m3 scale times 2^117: v * s *
2^-9, exact), the global scale and 2^9 on the accumulator at the end.

Split-K as in int4_mma (fp32 slices, the last program of a tile adds them in slice order:
deterministic). Forward only, fast mode only, sm_90 only (wgmma).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from orbit.kernels.int4_mma import HAS_GLUON

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from orbit.kernels.int4_mma import _as_rows, _cta_barrier, _pdl_enter, _tma_load

# Rows of x the kernel takes (the wgmma's N is at most 256; column tiles of NP cover M).
MIN_M = 1
MAX_M = 256
BK = 64  # K per step: one 128-byte swizzled row of x per TMA box row (8 words of codes)
# The ring of steps in shared memory (each a step's x tile, NP x BK x 2 bytes, and words, BN x
# 32 bytes): as deep as RING_BYTES allows, MIN..MAX_STAGES. Why deep: a program's weight bytes
# in flight are (stages - 1) x BN x 32; at 3 TB/s and ~1 us of DRAM latency an SM needs ~23 KB
# in flight, and two programs share an SM.
RING_BYTES = 96 * 1024
MIN_STAGES = 2
MAX_STAGES = 8
# Programs per SM the split rule aims at (each holds 64 weight rows per warpgroup).
PROGRAMS_PER_SM = 2
# Shallowest K slice a split may leave (steps of BK: the pipeline needs a few).
MIN_SLICE_K = 512
MAX_SPLIT = 16
WARPGROUPS = (1, 2, 4)


@dataclass(frozen=True)
class WgmmaConfig:
    """np_: columns of x per program (the wgmma's N: 64 or 128; M beyond it takes more column
    tiles); warpgroups: 64-row weight blocks per program (sharing the x ring); split: K
    slices; stages: the ring's depth (steps of words and x in shared memory); pdl: launch
    with programmatic dependent launch even outside the engine's pdl_scope (a benchmark's
    rows)."""

    np_: int = 128
    warpgroups: int = 1
    split: int = 1
    stages: int = 4
    pdl: bool = False

    @property
    def block_n(self) -> int:
        return 64 * self.warpgroups

    @property
    def num_warps(self) -> int:
        return 4 * self.warpgroups


FORMATS = ("int4", "nvfp4")


def supports(m: int, k: int, n: int, group: int, x_dtype: torch.dtype,
             scale_dtype: torch.dtype, has_offset: bool, fmt: str = "int4") -> bool:
    """Whether this kernel computes the forward: bf16 x of MIN_M..MAX_M rows and INT4
    (symmetric codes, bf16 scales in groups of a multiple of 64, K a multiple of the group)
    or NVFP4 (e4m3 scales per 16, K a multiple of 64); the device (sm_90: `available`) and
    the operands' alignment for TMA are the caller's to check."""
    if not (HAS_GLUON and MIN_M <= m <= MAX_M and not has_offset and x_dtype == torch.bfloat16):
        return False
    if fmt == "nvfp4":
        return group == 16 and scale_dtype == torch.float8_e4m3fn and k % BK == 0
    return (fmt == "int4" and scale_dtype == torch.bfloat16 and group % BK == 0
            and k % group == 0)


def available(device: torch.device) -> bool:
    """Whether `device` runs the kernel: CUDA sm_90 (wgmma is Hopper's; Blackwell has tcgen05
    instead)."""
    from orbit.kernels._qgemm import _capability  # (cached per device: asked every launch)

    return HAS_GLUON and device.type == "cuda" and _capability(device)[0] == 9


def column_tile(m: int) -> int:
    """The x columns per program for M = m rows: 64 up to 64 rows, else 128 (past 128 rows two
    column tiles, each re-decoding the weights from L2: 256 columns would take 128
    accumulator registers a thread)."""
    return 64 if m <= 64 else 128


def pick_config(m: int, k: int, n: int, group: int, sms: int) -> WgmmaConfig:
    """The column tile of `column_tile`; the most warpgroups (64 weight rows each, sharing one
    x tile: every program reads the whole x slice from L2, so x's L2 traffic is N / BN times
    x's bytes, 4x the codes' own bytes at BN = 64 and M = 64) that still leave the grid at
    least half an SM's worth of tiles; then the largest power-of-two split of K that keeps
    it within PROGRAMS_PER_SM programs per SM, slices at least MIN_SLICE_K deep and whole
    groups."""
    np_ = column_tile(m)
    tiles_m = -(-m // np_)
    wg = next(w for w in WARPGROUPS[::-1] if w == 1 or -(-n // (64 * w)) * tiles_m * 2 >= sms)
    split = fill_split(-(-n // (64 * wg)) * tiles_m, k, group, sms)
    return WgmmaConfig(np_=np_, warpgroups=wg, split=split, stages=ring_stages(np_, 64 * wg))


def split_fits(k: int, split: int, group: int, min_slice: int = MIN_SLICE_K) -> bool:
    """Whether K = k cuts into `split` slices of whole groups and BK-deep steps, each at least
    `min_slice` deep (1 always fits)."""
    return split == 1 or (k % (split * max(group, BK)) == 0 and k // split >= min_slice)


def fill_split(tiles: int, k: int, group: int, sms: int, min_slice: int = MIN_SLICE_K) -> int:
    """The largest power-of-two split of K (up to MAX_SPLIT) that keeps `tiles` output tiles'
    programs within PROGRAMS_PER_SM per SM and fits (`split_fits`)."""
    split = 1
    while (split * 2 <= MAX_SPLIT and tiles * split * 2 <= PROGRAMS_PER_SM * sms
           and split_fits(k, split * 2, group, min_slice)):
        split *= 2
    return split


def ring_stages(np_: int, block_n: int) -> int:
    """The ring depth that fits RING_BYTES (within MIN_STAGES..MAX_STAGES)."""
    return max(MIN_STAGES, min(MAX_STAGES, RING_BYTES // (np_ * BK * 2 + block_n * BK // 2)))


def check_config(cfg: WgmmaConfig, m: int, k: int, group: int) -> None:
    """Refuse what the kernel cannot run, naming the field."""
    if cfg.np_ not in (64, 128):
        raise ValueError(f"int4_wgmma: WgmmaConfig.np_ is 64 or 128, got {cfg.np_}")
    if cfg.warpgroups not in WARPGROUPS:
        raise ValueError(f"int4_wgmma: WgmmaConfig.warpgroups is one of {WARPGROUPS}, got "
                         f"{cfg.warpgroups}")
    if not MIN_STAGES <= cfg.stages <= MAX_STAGES:
        raise ValueError(f"int4_wgmma: WgmmaConfig.stages is {MIN_STAGES}..{MAX_STAGES}, got "
                         f"{cfg.stages}")
    if cfg.split < 1 or not split_fits(k, cfg.split, group, min_slice=1):
        raise ValueError(f"int4_wgmma: split {cfg.split} must cut K = {k} into slices of whole "
                         f"groups of {group} and {BK}-deep steps")
    if not MIN_M <= m <= MAX_M:
        raise ValueError(f"int4_wgmma: takes {MIN_M}..{MAX_M} rows of x, got {m}")


if HAS_GLUON:

    @cache  # (plain ints in, frozen layouts out: built once per config)
    def layouts(warpgroups: int, np_: int, r: int = 1):
        """The wgmma accumulator layout, its A operand layout, the word tile [BN, 8, 4] whose
        registers hold each thread's rows' 8 words of a step (dim 1) for its lane quad t
        (dim 2: the byte it decodes), the scales' load and shared layouts, a step's scale
        rows' read-back (`r` groups a step), and the output store's."""
        warps = 4 * warpgroups
        mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1],
                                        instr_shape=[16, np_, 16])
        a = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        lw = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16 << w, 0, 0] for w in range(warps.bit_length() - 1)],
            block_bases=[], shape=[64 * warpgroups, 8, 4])
        # the scales' load [GS, BN] (lanes along the rows) and its unswizzled shared tile
        ls = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32],
                              warps_per_cta=[1, warps], order=[1, 0])
        ss = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        # a step's [r, BN] scale rows (r groups: INT4 1, NVFP4 4), each thread all r of its
        # rows g and g + 8 (LW's rows)
        lsc = gl.DistributedLinearLayout(
            reg_bases=[[1 << j, 0] for j in range(r.bit_length() - 1)] + [[0, 8]],
            lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=[[0, 16 << w] for w in range(warps.bit_length() - 1)],
            block_bases=[], shape=[r, 64 * warpgroups])
        # the store: lanes down the weight rows (y's contiguous dimension), warps across x's
        out = gl.BlockedLayout(size_per_thread=[2, 1], threads_per_warp=[32, 1],
                               warps_per_cta=[1, warps], order=[0, 1])
        return mma, a, lw, ls, ss, lsc, out

    # the x ring's shared layout (the wgmma's B operand, 128-byte rows swizzled) and the word
    # ring's (unswizzled 32-byte rows: a warp's eight rows are 256 contiguous bytes, read
    # without bank conflicts; the four lanes of a quad read the same words)
    X_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    W_SMEM = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)

    # $0, $1: bf16(s * (u - 8)) of the two nibbles of byte t of word $2 (u at bits 0..3 and
    # 4..7 of the byte), $3 the prmt selector of byte t (0x4440 + t: bytes 1..3 zero), $4 the
    # group scale s: the byte times 0x1001 puts its low nibble at bits 0..3 and its high one
    # at 16..19, the OR the bf16 bits of 128 + u in each half, minus 136 (exact), times s (one
    # rounding: the reference's dequantized value)
    _PAIR_ASM = gl.constexpr(
        "{\n.reg .b32 a, s2, one, neg;\n"
        "mov.b32 one, 0x3F803F80;\nmov.b32 neg, 0xC308C308;\n"
        "prmt.b32 a, $2, 0, $3;\n"
        "mul.lo.u32 a, a, 0x1001;\n"
        "and.b32 a, a, 0x000F000F;\n"
        "or.b32 a, a, 0x43004300;\n"
        "fma.rn.bf16x2 a, a, one, neg;\n"
        "mov.b32 s2, {$4, $4};\n"
        "mul.rn.bf16x2 a, a, s2;\n"
        "mov.b32 {$0, $1}, a;\n}")

    # NVFP4: $0, $1: v * s * 2^-9 (exact) of the two E2M1 nibbles of byte t of word $2 ($3
    # its prmt selector), $4 the bf16 s * 2^117 of their group: the byte spread as for INT4,
    # then each nibble's bits 2..0 to bf16 bits 8..6 and bit 3 to bit 15 of its half (the
    # bits of v * 2^-126), one packed FMA by s' (+ -0): int4_mma's E2M1 decode
    _E2M1_ASM = gl.constexpr(
        "{\n.reg .b32 a, m, g, s2, nz;\n"
        "mov.b32 nz, 0x80008000;\n"
        "prmt.b32 a, $2, 0, $3;\n"
        "mul.lo.u32 a, a, 0x1001;\n"
        "shl.b32 m, a, 6;\n"
        "shl.b32 g, a, 12;\n"
        "and.b32 m, m, 0x01C001C0;\n"
        "and.b32 g, g, 0x80008000;\n"
        "or.b32 a, m, g;\n"
        "mov.b32 s2, {$4, $4};\n"
        "fma.rn.bf16x2 a, a, s2, nz;\n"
        "mov.b32 {$0, $1}, a;\n}")
    _E2M1_SCALE = gl.constexpr(2.0 ** 117)

    @gluon.jit
    def _decode(words, sc, ASM: gl.constexpr, A: gl.constexpr, LW: gl.constexpr,
                BN: gl.constexpr):
        # words [BN, 8, 1] int32 (a step's 8 words of each row, read by every t), sc [BN, 1, 1]
        # or [BN, 8, 1] bf16 (the scale each word's codes take: _PAIR_ASM's s, _E2M1_ASM's
        # s * 2^117) -> A operand [BN, 64] bf16 in natural K order: word w, lane quad t, nibble
        # j of the pair is K = 8 w + 2 t + j
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        words, sel = gl.broadcast(words, gl.expand_dims(gl.expand_dims(t + 0x4440, 0), 1))
        sc, words = gl.broadcast(sc, words)
        lo, hi = gl.inline_asm_elementwise(ASM, "=h,=h,r,r,h", [words, sel, sc],
                                           dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                           pack=1)
        v = gl.reshape(gl.join(lo, hi), [BN, 64])
        return gl.convert_layout(v, A, assert_trivial=True)

    @gluon.jit
    def _int4_wgmma_kernel(x_desc, w_desc, s_ptr, gs_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K,
                           stride_s, stride_y, K_SLICE, FMT: gl.constexpr,
                           GROUP: gl.constexpr, BN: gl.constexpr, NP: gl.constexpr,
                           SPLIT: gl.constexpr, STAGES: gl.constexpr, GS: gl.constexpr,
                           MMA: gl.constexpr, A: gl.constexpr, LW: gl.constexpr,
                           XS: gl.constexpr, WS: gl.constexpr, LS: gl.constexpr,
                           SS: gl.constexpr, LSC: gl.constexpr, LOUT: gl.constexpr,
                           PDL: gl.constexpr = False):
        # grid: (N tiles x M tiles x SPLIT): program (tile_n, tile_m, ks) computes
        # out^T[tile_n BN + :BN, tile_m NP + :NP] over the K slice ks. Slot st of the ring
        # holds step st + STAGES j on its j-th use (mbarrier phase j & 1): the step's words
        # [BN, 8] and x tile [NP, 64], both by TMA, counted on the slot's barrier.
        pid = gl.program_id(0)
        ks = pid % SPLIT
        tile = pid // SPLIT
        tiles_m = gl.cdiv(M, NP)
        tile_m = tile % tiles_m
        tile_n = tile // tiles_m
        n0 = tile_n * BN
        k_lo = ks * K_SLICE
        steps = K_SLICE // 64
        STEP_BYTES: gl.constexpr = NP * 64 * 2 + BN * 32

        ws_ring = gl.allocate_shared_memory(gl.int32, [STAGES, BN, 8], WS)
        xs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, NP, 64], XS)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for st in gl.static_range(STAGES):
            mbarrier.init(bars.index(st), count=1)
        fence_async_shared()  # (the inits visible to the copy engine before its arrivals)
        # frozen weights before the PDL wait: the first steps' words, the slice's scales
        # (GS groups a row, [GS, BN] in shared memory: a step reads its group's row)
        for st in gl.static_range(STAGES - 1):
            ok = st < steps
            mbarrier.expect(bars.index(st), STEP_BYTES, pred=ok)
            _tma_load(w_desc, [n0, (k_lo + st * 64) // 8], bars.index(st), ws_ring.index(st),
                      pred=ok)
        sg = gl.arange(0, GS, layout=gl.SliceLayout(1, LS))
        sn = gl.minimum(n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, LS)), N - 1)
        sv = gl.load(s_ptr + gl.expand_dims(sn, 0) * stride_s + k_lo // GROUP
                     + gl.expand_dims(gl.minimum(sg, K_SLICE // GROUP - 1), 1))
        if FMT == 3:  # NVFP4: the e4m3 scale as the bf16 s * 2^117 the decode multiplies by
            sv = (sv.to(gl.float32) * _E2M1_SCALE).to(gl.bfloat16)  # exact: <= 1.75 * 2^125
        # [GS / R, R, BN]: a step's R groups (INT4 1, NVFP4 4) are one index
        R: gl.constexpr = 4 if FMT == 3 else 1
        ss = gl.allocate_shared_memory(gl.bfloat16, [GS // R, R, BN], SS)
        _as_rows(ss, gl.bfloat16, GS, BN, SS).store(sv)
        _pdl_enter(PDL)
        for st in gl.static_range(STAGES - 1):
            _tma_load(x_desc, [tile_m * NP, k_lo + st * 64], bars.index(st), xs.index(st),
                      pred=st < steps)
        _cta_barrier()  # (every warp reads every row's scales)

        acc = gl.zeros([BN, NP], gl.float32, MMA)
        for i in range(steps):
            slot = i % STAGES
            mbarrier.wait(bars.index(slot), (i // STAGES) & 1)
            words = gl.expand_dims(ws_ring.index(slot).load(gl.SliceLayout(2, LW)), 2)
            if FMT == 3:
                # the step's 4 groups [4, BN] -> each word's [BN, 8] (word w: group w // 2)
                s4 = gl.permute(ss.index(i).load(LSC), (1, 0))
                sc = gl.convert_layout(gl.reshape(gl.join(s4, s4), [BN, 8]),
                                       gl.SliceLayout(2, LW), assert_trivial=True)
                a = _decode(words, gl.expand_dims(sc, 2), _E2M1_ASM, A, LW, BN)
            else:
                sc = gl.convert_layout(gl.reshape(ss.index((i * 64) // GROUP).load(LSC), [BN]),
                                       gl.SliceLayout(1, gl.SliceLayout(2, LW)),
                                       assert_trivial=True)
                a = _decode(words, gl.expand_dims(gl.expand_dims(sc, 1), 2), _PAIR_ASM, A,
                            LW, BN)
            acc = warpgroup_mma(a, xs.index(slot).permute((1, 0)), acc, is_async=True)
            # at most this step's wgmma in flight: the previous step's slot is free once every
            # warp has passed here (its words read, its wgmma done)
            acc = warpgroup_mma_wait(1, deps=[acc])
            _cta_barrier()
            fence_async_shared()
            nxt = i + STAGES - 1
            ok = nxt < steps
            ns = nxt % STAGES
            mbarrier.expect(bars.index(ns), STEP_BYTES, pred=ok)
            _tma_load(w_desc, [n0, (k_lo + nxt * 64) // 8], bars.index(ns), ws_ring.index(ns),
                      pred=ok)
            _tma_load(x_desc, [tile_m * NP, k_lo + nxt * 64], bars.index(ns), xs.index(ns),
                      pred=ok)
        acc = warpgroup_mma_wait(0, deps=[acc])
        if FMT == 3:  # the global scale, and the decode's 2^-9
            acc = acc * (gl.load(gs_ptr) * 512.0)
        for st in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(st))

        out = gl.convert_layout(acc, LOUT)
        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LOUT))
        om = tile_m * NP + gl.arange(0, NP, layout=gl.SliceLayout(0, LOUT))
        mask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
        if SPLIT == 1:
            gl.store(y_ptr + gl.expand_dims(om, 0) * stride_y + gl.expand_dims(on, 1),
                     out.to(gl.bfloat16), mask=mask)
        else:
            # fp32 slice ks into ws [SPLIT, M, N]; the last program of the tile to arrive adds
            # the slices in slice order (deterministic) and re-arms the counter
            off = gl.expand_dims(om, 0) * N + gl.expand_dims(on, 1)
            slab = M * N
            gl.store(ws_ptr + ks * slab + off, out, mask=mask)
            _cta_barrier()
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = gl.zeros([BN, NP], gl.float32, LOUT)
                for sl in range(SPLIT):
                    total += gl.load(ws_ptr + sl * slab + off, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                gl.store(y_ptr + gl.expand_dims(om, 0) * stride_y + gl.expand_dims(on, 1),
                         total.to(gl.bfloat16), mask=mask)
                gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")


def slice_groups(k_slice: int, group: int) -> int:
    """GS: the scale groups a program stages (those of its K slice), rounded up to a power of
    two (Triton ranges); at least 4 (NVFP4 reads a step's four at once)."""
    g = max(4 if group == 16 else 1, k_slice // group)
    return 1 << (g - 1).bit_length()


def kernel_constants(cfg: WgmmaConfig, group: int, k_slice: int, fmt: str = "int4") -> dict:
    """The constexpr arguments of `_int4_wgmma_kernel` for `cfg` on a K slice of `k_slice`
    (the launch's and the offline sm_90 compile's), PDL excepted."""
    from orbit.kernels._qgemm import FMT_IDS

    mma, a, lw, ls, ss, lsc, out = layouts(cfg.warpgroups, cfg.np_, 4 if fmt == "nvfp4" else 1)
    return {"FMT": FMT_IDS[fmt], "GROUP": group, "BN": cfg.block_n, "NP": cfg.np_, "SPLIT": cfg.split,
            "STAGES": cfg.stages, "GS": slice_groups(k_slice, group), "MMA": mma, "A": a,
            "LW": lw, "XS": X_SMEM, "WS": W_SMEM, "LS": ls, "SS": ss, "LSC": lsc,
            "LOUT": out}


def x_fits(x: Tensor) -> bool:
    """Whether TMA can read x: unit-stride rows, 16-byte aligned (start and row stride)."""
    return x.stride(1) == 1 and (x.stride(0) * 2) % 16 == 0 and x.data_ptr() % 16 == 0


def words_fit(q: Tensor) -> bool:
    """Whether TMA can read the codes `q` (int32 words or NVFP4's bytes) as word rows:
    unit-stride rows of a multiple of 16 bytes that start 16-byte aligned."""
    return (q.stride(-1) == 1 and (q.stride(0) * q.element_size()) % 16 == 0
            and q.data_ptr() % 16 == 0)


def descriptors(x: Tensor, qweight: Tensor, cfg: WgmmaConfig):
    """The TMA descriptors of x [M, K] bf16 (an [NP, BK] box; rows past M read as zeros) and
    of the words [N, K / 8] int32 (a [BN, BK / 8] box; rows past N read as zeros); refuses
    what TMA cannot address. Made per call: the launcher encodes them on the host (a CUDA
    graph captures them by value)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    if not x_fits(x):
        raise ValueError(f"int4_wgmma: TMA needs x rows 16-byte aligned with unit stride; "
                         f"stride {x.stride()}, address {x.data_ptr():#x}")
    if not words_fit(qweight):
        raise ValueError(f"int4_wgmma: TMA needs 16-byte aligned word rows; stride "
                         f"{qweight.stride()}, address {qweight.data_ptr():#x}")
    return (TensorDescriptor.from_tensor(x, [cfg.np_, BK], X_SMEM),
            TensorDescriptor.from_tensor(qweight, [cfg.block_n, BK // 8], W_SMEM))


def int4_wgmma(x: Tensor, qweight: Tensor, scale: Tensor, group: int,
               cfg: WgmmaConfig | None = None, out: Tensor | None = None, fmt: str = "int4",
               global_scale: Tensor | None = None) -> Tensor:
    """y = x @ W^T, bf16 x [M, K]. INT4: int32-packed symmetric codes `qweight` [N, K / 8] (LSB
    first, u - 8 the value), bf16 `scale` [N, K / group]. NVFP4: E2M1 code bytes [N, K / 2]
    (read as int32 words), e4m3 `scale` [N, K / 16], fp32 `global_scale` (one element)."""
    from orbit.kernels.gemv import arrival_counters, num_sms
    from orbit.kernels.pdl import pdl_launch

    m, k = x.shape
    n = qweight.shape[0]
    if fmt == "nvfp4":
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (n, k // 2):
            raise ValueError(f"int4_wgmma: NVFP4 qweight must be uint8 [N, K / 2] = [{n}, "
                             f"{k // 2}], got {qweight.dtype} {tuple(qweight.shape)}")
        if global_scale is None or global_scale.numel() != 1:
            raise ValueError("int4_wgmma: NVFP4 needs its fp32 global_scale (one element)")
        words = qweight.view(torch.int32)
        sdt = torch.float8_e4m3fn
    elif fmt == "int4":
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != (n, k // 8):
            raise ValueError(f"int4_wgmma: qweight must be int32 [N, K / 8] = [{n}, {k // 8}], "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        words = qweight
        sdt = torch.bfloat16
    else:
        raise ValueError(f"int4_wgmma: formats {FORMATS}, got {fmt!r}")
    if scale.dtype != sdt or tuple(scale.shape) != (n, k // group):
        raise ValueError(f"int4_wgmma: {fmt} scale must be {sdt} [N, K / group] = [{n}, "
                         f"{k // group}], got {scale.dtype} {tuple(scale.shape)}")
    if not supports(m, k, n, group, x.dtype, scale.dtype, False, fmt):
        raise ValueError(f"int4_wgmma: unsupported operands ({fmt}, M={m}, K={k}, group "
                         f"{group}, x {x.dtype}); see int4_wgmma.supports")
    if not available(x.device):
        raise ValueError("int4_wgmma: needs a CUDA sm_90 device (wgmma)")
    if scale.stride(1) != 1:
        raise ValueError("int4_wgmma: scale rows must have unit stride")
    cfg = cfg or pick_config(m, k, n, group, num_sms(x.device))
    check_config(cfg, m, k, group)
    y = out if out is not None else torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if y.shape != (m, n) or y.dtype != torch.bfloat16 or y.stride(1) != 1:
        raise ValueError(f"int4_wgmma: out must be bf16 [{m}, {n}] with unit column stride")
    tiles = -(-n // cfg.block_n) * -(-m // cfg.np_)
    if cfg.split > 1:
        ws = torch.empty(cfg.split, m, n, dtype=torch.float32, device=x.device)
        cnt = arrival_counters(x.device, tiles)
    else:
        ws, cnt = y, y
    x_desc, w_desc = descriptors(x, words, cfg)
    _int4_wgmma_kernel[(tiles * cfg.split,)](
        x_desc, w_desc, scale, global_scale if global_scale is not None else y, y, ws, cnt,
        m, n, k, scale.stride(0), y.stride(0), k // cfg.split,
        **kernel_constants(cfg, group, k // cfg.split, fmt),
        num_warps=cfg.num_warps, **pdl_launch(x.device, tiles * cfg.split, forced=cfg.pdl))
    return y
