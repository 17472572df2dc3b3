"""The one fused dequantize-GEMM loop that every weight-only format shares.

`y = x @ W^T` (forward) and `dx = dy @ W` (input gradient) differ only in which weight dim is
reduced, so one kernel does both (`TRANS`). The per-format tile loaders (int4.py, int8.py,
fp8.py, fp4.py) turn a packed `[rows over out, cols over in]` patch of the weight into float32
exactly as `orbit.quant.qweight.dequantize` does; the loop here casts it to the activation
dtype and feeds `tl.dot` with an fp32 accumulator. The weight is never materialized in BF16.

Tile configs: the fast mode picks one by M (no autotuning, so a shape always runs the same
code); `exact=True` uses one fixed config for every M, no split-K, so every output row sees the
same reduction order whatever else is in the batch (batch invariance).
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton
from orbit.kernels.fp4 import mxfp4_tile, nvfp4_tile
from orbit.kernels.fp8 import fp8_tile
from orbit.kernels.int4 import int4_tile
from orbit.kernels.int8 import int8_tile
from orbit.kernels.lora_decode import DOT_BK, SHRINK_BM
from orbit.kernels.lora_epilogue import (
    LoRAEpilogue,
    kernel_args,
    lora_await,
    lora_release,
    lora_shrink_role,
    lora_shrink_role_dot,
    lora_store_dot,
    shrink_program,
)
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.kernels.norm_prologue import NormPrologue
from orbit.kernels.plane_dot import NVFP4_ASM_EPILOGUE, UNPACK_PLANE_PAIRS, plane_pair_step
from orbit.kernels.qmm_routes import ROUTE_FORMATS, ROUTES, Route
from orbit.kernels.tile_config import TileConfig
from orbit.quant.qweight import QuantizedWeight

FMT_IDS = {"int4": 0, "int8": 1, "fp8": 2, "nvfp4": 3, "mxfp4": 4, "bf16": 5}
ACT_DTYPES = (torch.bfloat16, torch.float16)


# Measured on the H100 (docs/kernels.md): the join tree wins for int32 words, the 3-D shift
# for bytes.
DEFAULT_UNPACK = {"int4": 2, "nvfp4": 0, "mxfp4": 0}


# (jit code reads only constexpr globals: the CPU interpreter does not enforce it, the GPU
# compiler does; tests/unit/test_qgemm_sm90_compile.py compiles the real kernel offline)
_UNPACK_PAIRS = tl.constexpr(UNPACK_PLANE_PAIRS)

# The separate LoRA shrink kernel's tensor-core K step, as the dot loop's shrink programs use it
# (orbit/kernels/lora_epilogue.py).
_SHRINK_DOT_BK = tl.constexpr(DOT_BK)

# Fast mode from this many rows on: dequantize into a transient BF16 weight, then cuBLAS
# (DEQUANT_MIN_M_BY_FMT per format where measured, else DEQUANT_MIN_M: set from training
# shapes). Rollout batch sizes, H100, session 23 (docs/benchmarks.md; `bench_qmm.py --mid` per
# GEMM, `bench_engine.py --knob` on Qwen3-1.7B decode): the fused tl.dot loop's cost grows
# with the rows while the dequantization pass does not, and cuBLAS then runs near the BF16
# base's speed. Per GEMM the crossover was 32 rows for NVFP4 (6144x2048: 22.2 vs 51.5 us),
# 64 for INT4 (22.6 vs 40.5; even on 2048x6144) and 128 for FP8 (64 rows: 20.1 vs 15.6 on
# 2048x6144, 24.7 vs 29.8 on 6144x2048). Engine decode tok/s, loop -> dequantize + cuBLAS:
# NVFP4 batch 32 5522 -> 8424, INT4 batch 64 14268 -> 16013 (batch 32: 9230 -> 8838, so not
# there), FP8 batch 128 17166 -> 27220 (batch 64: 15950 -> 15391); batch 256: INT4 21378 ->
# 43036, FP8 28692 -> 42007, NVFP4 13070 -> 41956. MXFP4 and INT8 are not measured.
DEQUANT_MIN_M = 1024
DEQUANT_MIN_M_BY_FMT: dict[str, int] = {"nvfp4": 32, "int4": 64, "fp8": 128}


def dequant_min_m(fmt: str) -> int:
    """The rows from which a fast-mode `fmt` call dequantizes and runs cuBLAS."""
    return DEQUANT_MIN_M_BY_FMT.get(fmt, DEQUANT_MIN_M)

# Fast-mode forward calls with at most this many rows may run the decode GEMV / split-K
# kernel (orbit/kernels/gemv.py) instead of the tl.dot loop; 0 disables it. Exact mode never
# does. H100 sweep (docs/kernels.md, 2026-11-22): the GEMV only wins where the dot loop cannot
# fill the SMs, i.e. where it splits K deeply (6144->2048: int4 M=1 11.4 vs 23.9 us, nvfp4
# M=4 23 vs 44 us); on wide shapes (4096x12288) and at M=16 it loses up to 9x. So it runs
# only at M <= GEMV_MAX_M with a split of at least GEMV_MIN_SPLIT (int4 at M=1: 4).
# Session 4 added the nibble-plane GEMV for 4-bit formats; at M = 1 it beat the dot loop on
# every shape swept (int4 4096x12288: 21.7 vs 32.0 us, 6144x2048: 10.4 vs 23.8; nvfp4 33.6 vs
# 55.5 and 15.4 vs 44.2), so those formats take it at M = 1 whatever the split. At M = 4 and
# 16 it lost on wide shapes (its per-row CUDA-core FMAs), so the split rule stays there.
# Session 8 added the FP8 M = 1 kernel (orbit/kernels/gemv_fp8.py; H200: 4096x12288 22.7 vs
# 23.4 us for the dot loop, 6144x2048 10.7 vs 17.2, 2048x2048 6.1 vs 7.3, 2048x6144 within
# 1%), so FP8 joins them at M = 1; at M = 4 it lost to the dot loop and the tile GEMV.
GEMV_M1 = ("int4", "nvfp4", "mxfp4", "fp8")
GEMV_MAX_M = 4
GEMV_MIN_SPLIT = 8
GEMV_MIN_SPLIT_INT4_M1 = 4
GEMV_FORMATS = ("int4", "int8", "fp8", "nvfp4", "mxfp4")

# Fast-mode forwards whose operands int4_mma takes (bf16 x; INT4: symmetric codes, bf16
# scales in groups of 64 or a multiple of 128; NVFP4: 4-byte aligned code rows) run the Gluon
# mma.sync kernel (orbit/kernels/int4_mma.py) on sm_80+ within their format's MMA_ROWS
# (first, last row count), before any route table. A launch with a store epilogue (LoRA,
# SwiGLU, norm) keeps its fused kernel; the *_fits questions answer for the mma route when
# asked with mma_ok, which dispatch does for SwiGLU and the norm folds (the engine then runs
# them as separate launches) and, per MMA_WITH_LORA_MIN_M, for a LoRA delta. H100 measurements
# (docs/benchmarks.md, sessions 21-22):
# - INT4, 2-8 rows (session 21): 4096x12288 M = 4 16.8-17.7 us against 32.4 for the tl.dot
#   loop and 41.7 for cuBLAS BF16; 9-16 rows and batch 1 lost then. Since warps along K
#   (int4_mma.WARP_K, session 30) INT4 takes 1-16 rows: engine batch 1 787.8 -> 869.8, batch
#   12 5152 -> 6266, batch 16 6437 -> 7977 tok/s (LoRA r16 batch 16 4017 -> 5756). At batch 1
#   the fold of the add + norm into the plane GEMV goes with it; keeping the wide q/k/v and
#   gate/up GEMVs on the plane GEMV (with their fold) and only o_proj / down on the mma
#   kernel measured 713.5 tok/s against 869.2 (docs/kernels.md "Warps along K").
# - INT4, 17-32 rows (32 MMA columns, session 31): engine batch 24 9104 -> 9580, batch 32
#   11221 -> 12087 tok/s (+5.2%, +7.7%); LoRA r16 batch 24 4825 -> 4937, 32 6351 -> 6378.
#   Isolated 2048x4096 M = 32: 10.5 us against the tl.dot loop's 11.0.
# - NVFP4, 1-16 rows: it beats both kernels NVFP4 ran before on every Qwen3 shape and row
#   count (4096x12288: M = 1 18.0 us vs the plane GEMV's 21.0; M = 4 18.6 and M = 16 22.2 vs
#   the register-fed tile's 43.4 and 63.0; cuBLAS BF16 41.7). 17-32 rows since session 35
#   (`pending_device_runs.sh g`, two (1, 16) / (1, 32) pairs in one process, 256 tokens):
#   batch 17 4435 -> 6750 tok/s (+52%), 24 6325 -> 9039 (+43%), 32 9819 -> 12821 (+31%).
# - FP8 (the FP8 form, session 23): isolated, slower than the tl.dot loop on the wide Qwen3
#   shapes (4096x12288 M = 4 31.1 vs 24.8 us in session 35) and faster on the deep 6144x2048
#   (11.8 vs 16.4), so sessions 24-34 routed deep weights only, at 4-8 rows. In the engine
#   the whole layer on the mma kernel is faster though (its PDL edges; the tl.dot loop is a
#   plain launch): session 35, H100, Qwen3-1.7B, two pairs per row count in one process,
#   every shape against deep-only: batch 4 2415 -> 2529 tok/s (+4.7%), 8 3630 -> 3796
#   (+4.6%), 16 6265 -> 5882 (-6%); every shape against none at batch 2 1308 -> 1332 (+1.9%),
#   batch 1 688 -> 673 (-2%: the FP8 GEMV keeps one row). So FP8 takes 2-8 rows, any shape.
# An entry removed (or the dict emptied) turns the route off for that format.
MMA_ROWS: dict[str, tuple[int, int]] = {"int4": (1, 32), "nvfp4": (1, 32), "fp8": (2, 8)}
# INT4 and NVFP4 at rollout rows on Hopper's warpgroup MMA (orbit/kernels/int4_wgmma.py: the
# decoded weights the wgmma's register operand, x by TMA; sm_90 only), per format (first, last
# row count), after MMA_ROWS. Written in session 36 to replace dequantize + cuBLAS and the tl.dot
# loop from 33 rows, where the INT4 base decoded slower than BF16 (session 35, H100: batch 64
# 21.4k against 22.1k tok/s, batch 256 46.6k against 57.6k). Off until measured
# (`pending_device_runs.sh v`, then the engine with --knob ..._qgemm.WGMMA_ROWS).
WGMMA_ROWS: dict[str, tuple[int, int]] = {}
# Formats whose mma route also needs a deep weight: K >= this multiple of N (sessions 24-34:
# {"fp8": 3}, FP8's down projections alone; empty since session 35, see FP8 above).
MMA_MIN_K_OVER_N: dict[str, int] = {}
# From how many rows a forward that carries a LoRA delta (an adapter active in the engine: what
# RL rollouts run) takes the mma route too (within MMA_ROWS), its delta then in separate
# shrink / expand launches (dispatch.lora_foldable says no). Below it the forward keeps its
# fused-epilogue kernel (the decode GEMV or the tl.dot loop computing h and adding the delta
# in its store). H100, Qwen3-1.7B decode with LoRA r16 on every linear (session 24,
# `bench_engine.py --sections lora --knob`, mma route vs the fused loop): INT4 batch 2 -6%,
# 4 +-0, 6 +153% (915.6 -> 2313.1 tok/s), 8 +146% (1214.2 -> 2992.9); FP8 4 +1%, 8 +24%;
# NVFP4 1 / 4 / 16 +-0 (its LoRA forwards there have no fused-epilogue kernel to keep). The
# loop with its in-kernel shrink at 5-8 rows was slower than at 4. int4_mma.MAX_M + 1: never.
MMA_WITH_LORA_MIN_M = 5
# A stacked gate/up forward on the mma route stores SwiGLU's output itself (int4_mma's
# swiglu: the gate and up rows of each MMA tile paired in its store, bit for bit the plain
# store followed by the silu_mul launch), one launch per layer fewer (dispatch.qmm_swiglu).
# Written in session 31 (the same K loop, 40 more instructions in the store at M = 1).
# Measured in session 32 (H100, Qwen3-1.7B decode, two off/on pairs in one process, bench_engine
# --knob orbit.kernels._qgemm.MMA_SWIGLU=False,True,False,True): INT4 b1 869.6 -> 876.4 tok/s
# (+0.8%), b4 3202.6 -> 3250.8 (+1.5%), b16 / b32 +-1%; NVFP4 b1 +0.7%, b4 +1.4%, b16 / b32
# +-0.5%. GPU bits tests (47) pass.
MMA_SWIGLU = True
# From how many rows (rounded up to a power of two) the tl.dot loop's in-kernel LoRA shrink
# runs as one tensor-core program per row block over all of K, instead of one program per row
# of A (r programs, each its rows over all of K). Below this the one block program is the
# launch's critical path: every output tile waits for its h. H100, Qwen3-1.7B decode with LoRA
# r16 on every linear (session 25, `bench_engine.py --sections lora --knob
# orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8,16,32,64`), threshold 8 -> 32: FP8 batch 6
# 1149.3 -> 2097.1 tok/s (+82%), 8 1516.2 -> 2748.4 (+81%), 16 2412.7 -> 4121.7 (+71%),
# 32 +-0; INT4 batch 16 2379.6 -> 3996.5 (+68%), 32 +-0 (INT4 at 5-8 rows takes the mma route,
# which stays faster: batch 8 2982.2 vs 2599.4 for the loop at 32); NVFP4 +-0 (no loop
# epilogue at those rows). 128 (row-of-A at 33-64 rows) lost 40%: FP8 batch 48 6687.9 ->
# 4035.2, 64 8709.8 -> 5295.6.
LOOP_SHRINK_DOT_MIN_M = 32


def _gemv_by_rule(m: int, n: int, k: int, fmt: str, device: torch.device) -> bool:
    """The static rule for the decode GEMV (see GEMV_MAX_M)."""
    if m > GEMV_MAX_M or fmt not in GEMV_FORMATS:
        return False
    from orbit.kernels.gemv import num_sms, pick_gemv_config  # gemv.py imports this module

    if m == 1 and fmt in GEMV_M1:
        return True
    split = pick_gemv_config(m, n, k, fmt, num_sms(device)).split
    need = GEMV_MIN_SPLIT_INT4_M1 if (fmt == "int4" and m == 1) else GEMV_MIN_SPLIT
    return split >= need


# Register-fed plane-pair tiles by rule (orbit/kernels/plane_dot.py, "Register-fed"): NVFP4
# fast-mode forwards at 2..REG_FED_MAX_M rows on sm_90+ without a route-table entry. H100,
# session 14 (`tune-qmm --grid regfed`, Qwen3-1.7B): the swapped one-stage pairs beat the rules'
# pipelined tile (or the GEMV) on every NVFP4 shape at M = 4 and 16, by 1.27-2.31x, and
# lifted batch-16 engine decode by 52%; `regfed_config` reproduces the winners' tiles (64 or
# 128 weight rows, 128 deep, split for ~8 programs per SM). M = 1 keeps the plane GEMV.
# H200, same session, the wide 4096x12288 (50M weights): at M = 4 the register-fed tiles still
# beat the rules' tile (43.4-46.7 vs 55.7 us) but at M = 16 they lose (63.9 vs 54.6 us), so
# past REG_FED_WIDE weights the rule stops at REG_FED_WIDE_MAX_M rows.
REG_FED_FORMATS = ("nvfp4",)
REG_FED_MAX_M = 16
REG_FED_WIDE = 1 << 24
REG_FED_WIDE_MAX_M = 4
REG_FED_PROGRAMS_PER_SM = 8


def regfed_split(tiles: int, steps: int, sms: int) -> int:
    """K split of a register-fed grid of `tiles` output tiles and `steps` K steps: powers of two
    up to 16 while the grid stays within REG_FED_PROGRAMS_PER_SM programs per SM and a slice
    keeps two K steps."""
    split = 1
    while (split < 16 and tiles * split * 2 <= REG_FED_PROGRAMS_PER_SM * sms
           and steps >= 4 * split):
        split *= 2
    return split


def regfed_config(m: int, n: int, k: int, sms: int) -> TileConfig:
    """The register-fed tile the rule runs: swapped plane pairs, one stage, 16 x rows, 64 weight
    rows (128 from 6144 out), 128 deep, split by `regfed_split`."""
    bo = 128 if n >= 6144 else 64
    split = regfed_split(triton.cdiv(m, 16) * triton.cdiv(n, bo), triton.cdiv(k, 128), sms)
    return TileConfig(bm=16, bo=bo, br=128, warps=4, stages=1, swap=True, split=split,
                      unpack=UNPACK_PLANE_PAIRS)


def _regfed_by_rule(m: int, n: int, k: int, fmt: str, device: torch.device) -> bool:
    max_m = REG_FED_WIDE_MAX_M if n * k > REG_FED_WIDE else REG_FED_MAX_M
    return (fmt in REG_FED_FORMATS and 2 <= m <= max_m and device.type == "cuda"
            and _capability(device)[0] >= 9)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None
                          else torch.cuda.current_device())


@cache
def _capability_of(index: int) -> tuple[int, int]:
    # (route() runs at every fast-mode launch: ask the driver once per device)
    return torch.cuda.get_device_capability(index)


def _mma_by_rule(m: int, n: int, k: int, fmt: str, device: torch.device) -> bool:
    from orbit.kernels.int4_mma import HAS_GLUON, MAX_M

    lo, hi = MMA_ROWS.get(fmt, (1, 0))
    return (lo <= m <= min(hi, MAX_M) and k >= MMA_MIN_K_OVER_N.get(fmt, 0) * n
            and device.type == "cuda" and HAS_GLUON and _capability(device)[0] >= 8)


def _wgmma_by_rule(m: int, fmt: str, device: torch.device) -> bool:
    from orbit.kernels.int4_wgmma import HAS_GLUON, MAX_M

    lo, hi = WGMMA_ROWS.get(fmt, (1, 0))
    return (lo <= m <= min(hi, MAX_M) and device.type == "cuda" and HAS_GLUON
            and _capability(device)[0] == 9)


def route(m: int, n: int, k: int, fmt: str, exact: bool, device: torch.device,
          transpose: bool = False, mma_ok: bool = False) -> Route:
    """Which kernel runs `x[m, k] @ W[n, k]^T` (or, transposed, `dy[m, n] @ W`) in `launch`.
    Exact mode: the dot loop with its fixed tile. Fast-mode forward: the mma.sync kernel
    where `mma_ok` and `_mma_by_rule` (the format's MMA_ROWS and MMA_MIN_K_OVER_N), else the
    device's route table where it has an entry for the shape (orbit/kernels/qmm_routes.py),
    else the rules: dequantize + cuBLAS from `dequant_min_m(fmt)` rows, the register-fed tile
    where `_regfed_by_rule` (NVFP4, 2-16 rows, 2-4 on wide weights, sm_90+), the decode GEMV
    where `_gemv_by_rule`, the dot loop with `pick_config`'s tile. The input gradient: the
    rules without the GEMV. Everything that asks whether a launch can carry extra work in
    its store (`lora_fits`, `swiglu_fits`) asks this, so the answer and the launch cannot
    disagree. `mma_ok`: the operands are ones a tensor-core decode kernel takes
    (`mma_operands_fit`), which opens the routes of `int4_mma` (`MMA_ROWS`) and, after it,
    `int4_wgmma` (`WGMMA_ROWS`)."""
    out_dim = k if transpose else n
    if exact:
        return Route("dot", pick_config(m, out_dim, fmt, True))
    if mma_ok and not transpose and _mma_by_rule(m, n, k, fmt, device):
        return Route("mma")
    if mma_ok and not transpose and _wgmma_by_rule(m, fmt, device):
        return Route("wgmma")
    if not transpose and fmt in ROUTE_FORMATS:
        tuned = ROUTES.lookup(device, fmt, n, k, m)
        if tuned is not None:
            return tuned
    if m >= dequant_min_m(fmt) and fmt != "bf16":
        return Route("dequant")
    if not transpose and _regfed_by_rule(m, n, k, fmt, device):
        from orbit.kernels.gemv import num_sms  # gemv.py imports this module

        return Route("dot", regfed_config(m, n, k, num_sms(device)))
    if not transpose and _gemv_by_rule(m, n, k, fmt, device):
        return Route("gemv")
    return Route("dot", pick_config(m, out_dim, fmt, False))


def use_gemv(m: int, n: int, k: int, fmt: str, device: torch.device,
             mma_ok: bool = False) -> bool:
    """Whether a fast-mode forward of this shape goes to the decode GEMV kernel."""
    return route(m, n, k, fmt, False, device, mma_ok=mma_ok).kind == "gemv"


def lora_fits(m: int, n: int, k: int, fmt: str, exact: bool, device: torch.device,
              members: int = 1, mma_ok: bool = False) -> bool:
    """Whether a fast-mode forward of this shape runs a kernel that adds a LoRA delta in its
    store (`launch(lora=...)`): the decode GEMV (1-3 members), or the `tl.dot` loop (one
    member)."""
    if exact or fmt not in GEMV_FORMATS or m < 1:
        return False
    r = route(m, n, k, fmt, False, device, mma_ok=mma_ok)
    # (the swapped dot loop, which only a route table picks, stores y^T: no epilogue there)
    # The loop's epilogue only below the rules' dequantize rows: a route table may send
    # rollout-size rows to the loop (session 26), but the in-loop shrink repeats x A^T in
    # every column tile, and at 48-64 rows the adapter-on loop cost FP8 ~45% (session 25)
    # where the decode groups' shrink + expand-add after the base cost INT4 / NVFP4 13-17%.
    # So those rows keep the group launches whatever the base route.
    return r.kind == "gemv" or (r.kind == "dot" and members == 1 and not r.config.swap
                                and m < dequant_min_m(fmt))


def swiglu_fits(m: int, n: int, k: int, fmt: str, exact: bool, device: torch.device,
                mma_ok: bool = False) -> bool:
    """Whether a fast-mode forward of the stacked gate/up weight [n, k] at m rows runs the
    nibble-plane decode GEMV, whose store can apply SwiGLU (`launch(swiglu=True)`)."""
    return n % 2 == 0 and prenorm_fits(m, n, k, fmt, exact, device, mma_ok)


def norm_fits(m: int, n: int, k: int, fmt: str, exact: bool, device: torch.device,
              mma_ok: bool = False) -> bool:
    """Whether a fast-mode forward of this shape runs the decode GEMV, whose last program can
    do the residual add + RMSNorm of the next layer input (`launch(norm=...)`,
    orbit/kernels/norm_epilogue.py)."""
    return (not exact and fmt in GEMV_FORMATS and m >= 1
            and use_gemv(m, n, k, fmt, device, mma_ok))


def prenorm_fits(m: int, n: int, k: int, fmt: str, exact: bool, device: torch.device,
                 mma_ok: bool = False) -> bool:
    """Whether a fast-mode forward of this shape runs the nibble-plane decode GEMV, which can
    take its input as residual + delta and do the RMSNorm itself (`launch(norm=
    NormPrologue)`, orbit/kernels/norm_prologue.py; `swiglu_fits` adds an even n)."""
    from orbit.kernels.gemv import PLANE_FORMATS  # gemv.py imports this module

    return (not exact and fmt in PLANE_FORMATS and m >= 1
            and use_gemv(m, n, k, fmt, device, mma_ok))


# The exact (batch-invariant) configs. What decides a row's bits is the K order: br-deep steps
# from 0 upward into one fp32 accumulator, no split-K; every exact config shares br=64. The
# tile's bm x bo may then change with M only where the GPU gives the same bits for it:
# `scripts/bench/exact_tiles.py` on the H100 (2026-11-22) found every bm >= 64 tile
# bit-identical to the training tile for int4 and bf16 on the Qwen3-1.7B shapes, and bm 16/32
# not (int4: Triton lowers those to mma.sync instead of wgmma). The GPU tests
# (test_exact_rows_do_not_depend_on_batch, test_exact_mode_engine_equals_trainer) check every
# format across both picks. Training sizes: the fastest fused config at M=8192.
EXACT_CONFIG = TileConfig(bm=128, bo=128, br=64, warps=4, stages=3)
# Decode sizes: 8x the programs along out and a 6-deep pipeline, so M <= 128 fills the SMs
# (`exact_tiles.py --decode`, H100, session 4: int4 6144->2048 at M=32 35.1 us; 64x32 with 3
# stages 51.8, the training tile 131).
EXACT_DECODE_CONFIG = TileConfig(bm=64, bo=16, br=64, warps=4, stages=6)
EXACT_DECODE_CONFIG_MX = TileConfig(bm=64, bo=32, br=64, warps=4, stages=6)
EXACT_DECODE_MAX_M = 128


def pick_config(m: int, out_dim: int, fmt: str, exact: bool) -> TileConfig:
    """Fast mode: small M is weight-bandwidth bound (thin bm, many programs along out);
    large M is MMA bound (big square tiles). Exact mode: see EXACT_CONFIG."""
    if exact:
        if m > EXACT_DECODE_MAX_M:
            return EXACT_CONFIG
        # The input gradient's weight tile is [br, bo] with bo along `in`: MXFP4's loader
        # needs a whole 32-wide scale group there.
        return EXACT_DECODE_CONFIG_MX if fmt == "mxfp4" else EXACT_DECODE_CONFIG
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        # Enough programs to cover 132 SMs about twice before the out tile gets wider.
        bo = 32 if triton.cdiv(out_dim, 64) < 264 else 64
        return TileConfig(bm=bm, bo=bo, br=128, warps=4, stages=4)
    if m <= 256:
        return TileConfig(bm=64, bo=128, br=64, warps=4, stages=4)
    return TileConfig(bm=128, bo=128, br=64, warps=4, stages=3)


@triton.jit
def bf16_tile(q_ptr, stride_q, n0, k0, N, K, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Unquantized weight tile, so `exact=True` covers BF16 linears too (cuBLAS picks its
    kernel by M and is not batch-invariant)."""
    offs_n = n0 + tl.arange(0, ROWS)
    offs_k = k0 + tl.arange(0, COLS)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    return tl.load(q_ptr + offs_n[:, None] * stride_q + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _w_tile(q_ptr, s_ptr, o_ptr, g_ptr, stride_q, stride_s, n0, k0, N, K,
            FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
            ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    if FMT == 0:
        w = int4_tile(q_ptr, s_ptr, o_ptr, stride_q, stride_s, n0, k0, N, K,
                      GROUP, HAS_OFFSET, ROWS, COLS, UNPACK)
    elif FMT == 1:
        w = int8_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K, GROUP, ROWS, COLS)
    elif FMT == 2:
        w = fp8_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K, ROWS, COLS)
    elif FMT == 3:
        w = nvfp4_tile(q_ptr, s_ptr, g_ptr, stride_q, stride_s, n0, k0, N, K, ROWS, COLS,
                       UNPACK)
    elif FMT == 4:
        w = mxfp4_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K, ROWS, COLS, UNPACK)
    else:
        w = bf16_tile(q_ptr, stride_q, n0, k0, N, K, ROWS, COLS)
    return w


@triton.jit
def _qgemm_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, g_ptr, M, N, K,
                  stride_xm, stride_ym, stride_q, stride_s, h_ptr, a0, a1, a2, b0, b1, b2, LN0,
                  LN1, LR, lscale, stride_hm, hc_ptr, LSR, ws_ptr, cnt_ptr,
                  FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                  TRANS: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr,
                  GROUP_M: tl.constexpr, UNPACK: tl.constexpr, SWAP: tl.constexpr = False,
                  LORA: tl.constexpr = 0, LRP: tl.constexpr = 1, SHRINK: tl.constexpr = False,
                  SBK: tl.constexpr = 16, SDOT: tl.constexpr = False, SBM: tl.constexpr = 16,
                  SPLIT: tl.constexpr = 1, PASM: tl.constexpr = False):
    # W is [N, K]. TRANS=0: y[M, N] = x[M, K] @ W^T. TRANS=1: y[M, K] = x[M, N] @ W.
    # SWAP (forward only, an experiment for decode M): accumulate y^T = W @ x^T, so the
    # dequantized weight is the MMA's A operand (which wgmma reads from registers) and the few
    # x rows the B operand (BM = the MMA's N, 16 at least); the result is stored transposed.
    # LORA (forward, no SWAP; one member): a LoRA delta added before the store
    # (orbit/kernels/lora_epilogue.py; the GEMV's argument list, of which h, a0, b0, LR,
    # lscale, stride_hm, hc_ptr and LSR are read). SHRINK: the first LSR programs compute h
    # (lora_epilogue: one row of A each below 8 rows, SDOT: one SBM-row block each), and every
    # tile program waits for their LSR signals before its delta.
    # SPLIT (forward; from a route table's tile): SPLIT programs per output tile, each over one
    # K-slice; fp32 partials in ws_ptr [SPLIT, M, N], and the last to arrive at the tile's
    # counter (cnt_ptr) adds them in slice order and stores (the GEMV's fix-up).
    # UNPACK == UNPACK_PLANE_PAIRS (int4 / nvfp4 / mxfp4 forward, SWAP or not): K steps over
    # nibble-plane pairs (orbit/kernels/plane_dot.py; fp4's q_ptr the bytes viewed as int32
    # words); PASM its bf16x2 inline-asm decode (int4, nvfp4).
    pid = tl.program_id(0)
    tile = pid
    if SHRINK:
        tile = pid - LSR
    if shrink_program(LSR, SHRINK):
        if SDOT:
            lora_shrink_role_dot(pid, x_ptr, stride_xm, M, K, a0, h_ptr, stride_hm, hc_ptr, LR,
                                 SBM, LRP, _SHRINK_DOT_BK)
        else:
            lora_shrink_role(pid, x_ptr, stride_xm, M, K, a0, a1, a2, h_ptr, stride_hm, hc_ptr,
                             LR, LSR, 1, SBM, SBK)
    else:
        _qgemm_main(tile, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, g_ptr, M, N, K, stride_xm,
                    stride_ym, stride_q, stride_s, h_ptr, b0, LR, lscale, stride_hm, hc_ptr, LSR,
                    ws_ptr, cnt_ptr, FMT, GROUP, HAS_OFFSET, TRANS, BM, BO, BR, GROUP_M, UNPACK,
                    SWAP, LORA, LRP, SHRINK, SPLIT, PASM)


@triton.jit
def _qgemm_main(pid, x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, g_ptr, M, N, K, stride_xm, stride_ym,
                stride_q, stride_s, h_ptr, b_ptr, LR, lscale, stride_hm, hc_ptr, LSR, ws_ptr,
                cnt_ptr, FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                TRANS: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr,
                GROUP_M: tl.constexpr, UNPACK: tl.constexpr, SWAP: tl.constexpr,
                LORA: tl.constexpr, LRP: tl.constexpr, SHRINK: tl.constexpr,
                SPLIT: tl.constexpr, PASM: tl.constexpr = False):
    """Program `pid` of _qgemm_kernel's tile programs (SPLIT per output tile)."""
    PAIRS: tl.constexpr = ((FMT == 0 or FMT == 3 or FMT == 4) and UNPACK == _UNPACK_PAIRS
                           and not TRANS)
    ks = 0
    if SPLIT > 1:
        ks = pid % SPLIT
        pid = pid // SPLIT
    if TRANS:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    num_m = tl.cdiv(M, BM)
    num_o = tl.cdiv(OUT, BO)
    # Grouped order: GROUP_M row blocks in a row reuse the same weight tiles from L2.
    per_group = GROUP_M * num_o
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_o = (pid % per_group) // size_m
    o0 = pid_o * BO
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_r = tl.arange(0, BR)
    r_lo = 0
    r_hi = RED
    if SPLIT > 1:  # slice ks: whole BR steps, so every tile loader sees its usual alignment
        per = tl.cdiv(tl.cdiv(RED, BR), SPLIT) * BR
        r_lo = ks * per
        r_hi = tl.minimum(RED, r_lo + per)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + r_lo + offs_r[None, :]
    dt = x_ptr.dtype.element_ty
    if SWAP:
        acc = tl.zeros((BO, BM), dtype=tl.float32)  # y^T tile
    else:
        acc = tl.zeros((BM, BO), dtype=tl.float32)
    offs_o = o0 + tl.arange(0, BO)
    for r0 in range(r_lo, r_hi, BR):
        if PAIRS:
            acc = plane_pair_step(acc, x_ptr, stride_xm, q_ptr, s_ptr, o_ptr, stride_q,
                                  stride_s, offs_m, offs_o, M, N, K, r0, GROUP, HAS_OFFSET, BR,
                                  PASM, FMT, SWAP)
        else:
            xmask = (offs_m[:, None] < M) & (r0 + offs_r[None, :] < RED)
            xt = tl.load(x_ptrs, mask=xmask, other=0.0)  # [BM, BR]
            if TRANS:
                w = _w_tile(q_ptr, s_ptr, o_ptr, g_ptr, stride_q, stride_s, r0, o0, N, K,
                            FMT, GROUP, HAS_OFFSET, BR, BO, UNPACK)  # [BR, BO]
                acc = tl.dot(xt, w.to(dt), acc)
            else:
                w = _w_tile(q_ptr, s_ptr, o_ptr, g_ptr, stride_q, stride_s, o0, r0, N, K,
                            FMT, GROUP, HAS_OFFSET, BO, BR, UNPACK)  # [BO, BR]
                if SWAP:
                    acc = tl.dot(w.to(dt), tl.trans(xt), acc)  # [BO, BM]
                else:
                    acc = tl.dot(xt, tl.trans(w.to(dt)), acc)
        x_ptrs += BR
    if PAIRS and FMT == 3:  # the nvfp4 steps leave the global scale (and the ASM's 2^-9) out
        gsf = tl.load(g_ptr).to(tl.float32)
        if PASM:
            gsf = gsf * NVFP4_ASM_EPILOGUE
        acc = acc * gsf
    if SPLIT > 1:
        if SWAP:  # acc is the y^T tile
            ymask = (offs_o[:, None] < OUT) & (offs_m[None, :] < M)
            w_off = offs_m[None, :] * OUT + offs_o[:, None]
        else:
            ymask = (offs_m[:, None] < M) & (offs_o[None, :] < OUT)
            w_off = offs_m[:, None] * OUT + offs_o[None, :]
        slab = (M * OUT).to(tl.int64)  # (M may be specialised to a constexpr 1)
        tl.store(ws_ptr + ks * slab + w_off, acc, mask=ymask)
        tl.debug_barrier()
        # release our slice, acquire the others' (the GEMV fix-up's pairing, gemv._store_out)
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT):  # slice order: the sum does not depend on who came last
                total += tl.load(ws_ptr + s * slab + w_off, mask=ymask, other=0.0,
                                 cache_modifier=".cg")
            if SWAP:
                tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_o[:, None], total.to(dt),
                         mask=ymask)
            else:
                _dot_store(total, y_ptr, stride_ym, offs_m, offs_o, M, OUT, h_ptr, b_ptr, LR,
                           lscale, stride_hm, hc_ptr, LSR, num_m * num_o, dt, LORA, LRP,
                           SHRINK)
            tl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed")  # re-armed for the next launch
    elif SWAP:
        ymask = (offs_o[:, None] < OUT) & (offs_m[None, :] < M)
        tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_o[:, None], acc.to(dt), mask=ymask)
    else:
        _dot_store(acc, y_ptr, stride_ym, offs_m, offs_o, M, OUT, h_ptr, b_ptr, LR, lscale,
                   stride_hm, hc_ptr, LSR, num_m * num_o, dt, LORA, LRP, SHRINK)


@triton.jit
def _dot_store(acc, y_ptr, stride_ym, offs_m, offs_o, M, OUT, h_ptr, b_ptr, LR, lscale,
               stride_hm, hc_ptr, LSR, TILES, dt: tl.constexpr, LORA: tl.constexpr,
               LRP: tl.constexpr, SHRINK: tl.constexpr):
    """The final values of an output tile into y: the fp32 accumulator rounded to dt, plus the
    LoRA delta where LORA (after the shrink programs' signal where SHRINK)."""
    ymask = (offs_m[:, None] < M) & (offs_o[None, :] < OUT)
    if LORA > 0:
        if SHRINK:
            lora_await(hc_ptr, LSR)
        yv = lora_store_dot(acc, offs_m, offs_o, M, OUT, h_ptr, b_ptr, LR, lscale, stride_hm,
                            dt, LRP, SHRINK)
        if SHRINK:
            lora_release(hc_ptr, TILES)
    else:
        yv = acc.to(dt)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_o[None, :], yv, mask=ymask)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, o_ptr, g_ptr, w_ptr, N, K, stride_q, stride_s, stride_w,
                    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    n0 = tl.program_id(0) * ROWS
    k0 = tl.program_id(1) * COLS
    w = _w_tile(q_ptr, s_ptr, o_ptr, g_ptr, stride_q, stride_s, n0, k0, N, K,
                FMT, GROUP, HAS_OFFSET, ROWS, COLS, UNPACK)
    offs_n = n0 + tl.arange(0, ROWS)
    offs_k = k0 + tl.arange(0, COLS)
    tl.store(w_ptr + offs_n[:, None] * stride_w + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


def dequantize_weight(fmt: str, shape: tuple[int, int], q: Tensor, s: Tensor,
                      offset: Tensor | None, global_scale: Tensor | None, group: int,
                      dtype: torch.dtype) -> Tensor:
    """The whole weight in `dtype` [out, in], equal to the reference dequantization. Only the
    fast path for large M uses it, as a transient buffer for one cuBLAS call."""
    n, k = shape
    w = torch.empty((n, k), device=q.device, dtype=dtype)
    rows, cols = 64, 128
    unpack = DEFAULT_UNPACK.get(fmt, 0)
    _dequant_kernel[(triton.cdiv(n, rows), triton.cdiv(k, cols))](
        q, s, offset if offset is not None else s,
        global_scale if global_scale is not None else s, w, n, k,
        q.stride(0), s.stride(0), w.stride(0), FMT=FMT_IDS[fmt], GROUP=group,
        HAS_OFFSET=offset is not None, ROWS=rows, COLS=cols, UNPACK=unpack, num_warps=4)
    return w


def check_activation(x: Tensor, name: str, features: int, device: torch.device) -> None:
    """Wrapper-side layout checks shared by every format (ValueError: caller's mistake)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, {features}], got shape {tuple(x.shape)}")
    if x.shape[1] != features:
        raise ValueError(f"{name} has {x.shape[1]} features, the weight expects {features}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16 for the kernels, got {x.dtype}")
    if x.shape[0] > 0 and x.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, the weight on {device}")


def check_tensor(t: Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype:
        raise ValueError(f"weight tensor {name!r} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"weight tensor {name!r} must have shape {shape}, got {tuple(t.shape)}")
    if t.numel() and t.stride(-1) != 1:
        raise ValueError(f"weight tensor {name!r} must have a contiguous last dim")


def check_out(out: Tensor | None, shape: tuple[int, int], x: Tensor) -> Tensor:
    """The caller's output buffer (tests poison it) after checks, or a fresh one."""
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype)
    if tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {x.dtype} {shape} on {x.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel() and out.stride(1) != 1:
        raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    return out


def mma_operands_fit(x: Tensor, fmt: str, shape: tuple[int, int], q: Tensor, scale: Tensor,
                     offset: Tensor | None, group: int) -> bool:
    """Whether int4_mma (`int4_mma.supports`; NVFP4 and FP8 codes are read as int32 words, so
    their rows must be 4-byte aligned) or, for INT4 and NVFP4 past its rows, int4_wgmma
    (`int4_wgmma.supports`: x by TMA, so 16-byte aligned rows) computes x @ W^T for these
    operands."""
    from orbit.kernels import int4_wgmma
    from orbit.kernels.int4_mma import FORMATS, MAX_M, supports, word_rows_aligned

    if fmt not in FORMATS or x.dim() != 2:
        return False
    if fmt in ("nvfp4", "fp8") and not word_rows_aligned(q):
        return False
    m = x.shape[0]
    if m > MAX_M:
        return (fmt in int4_wgmma.FORMATS and int4_wgmma.x_fits(x) and int4_wgmma.words_fit(q)
                and int4_wgmma.supports(m, shape[1], shape[0], group, x.dtype, scale.dtype,
                                        offset is not None, fmt))
    return supports(m, shape[1], shape[0], group, x.dtype, scale.dtype, offset is not None, fmt)


def launch(x: Tensor, fmt: str, shape: tuple[int, int], q: Tensor, s: Tensor,
           offset: Tensor | None, global_scale: Tensor | None, group: int,
           transpose: bool, exact: bool, out: Tensor | None = None,
           config: TileConfig | None = None, lora: LoRAEpilogue | None = None,
           swiglu: bool = False, norm: NormEpilogue | NormPrologue | None = None) -> Tensor:
    """Run the fused kernel on already-validated tensors; `config` overrides the pick (bench).
    `lora` adds a LoRA delta in the store of the decode GEMV or the `tl.dot` loop
    (orbit/kernels/lora_epilogue.py): only where `lora_fits`, else ValueError. `swiglu` (W the
    stacked gate/up weight): silu(gate) * up [M, out / 2] from the nibble-plane decode GEMV's
    store, only where `swiglu_fits`, else ValueError. `norm`: the decode GEMV's last program
    then does the residual add + RMSNorm (orbit/kernels/norm_epilogue.py), only where
    `norm_fits`, else ValueError; a NormPrologue: x is a delta and the nibble-plane decode GEMV
    does the residual add + RMSNorm of its own input (orbit/kernels/norm_prologue.py), only
    where `prenorm_fits` and without `lora`, else ValueError."""
    n, k = shape
    m = x.shape[0]
    out_dim = k if transpose else n
    if swiglu:
        if config is not None or transpose or not swiglu_fits(m, n, k, fmt, exact, x.device):
            raise ValueError(f"swiglu=True runs only in the fast-mode nibble-plane decode GEMV; "
                             f"{fmt} [{m} x {k}] @ [{n} x {k}]^T (exact={exact}) does not")
        out_dim = n // 2
    y = check_out(out, (m, out_dim), x)
    if lora is not None and (config is not None or transpose
                             or not lora_fits(m, n, k, fmt, exact, x.device, len(lora.b))):
        raise ValueError(f"a LoRA epilogue runs only in a fast-mode decode forward (several "
                         f"members: the decode GEMV only); {fmt} [{m} x {k}] @ [{n} x {k}]^T "
                         f"with {len(lora.b)} member(s) (exact={exact}, transpose={transpose}) "
                         "does not take it")
    if isinstance(norm, NormPrologue):
        if (config is not None or transpose or lora is not None
                or not prenorm_fits(m, n, k, fmt, exact, x.device)):
            raise ValueError(f"a norm prologue runs only in the fast-mode nibble-plane decode "
                             f"GEMV without a LoRA epilogue; {fmt} [{m} x {k}] @ [{n} x {k}]^T "
                             f"(exact={exact}, transpose={transpose}) does not take it")
    elif norm is not None and (config is not None or transpose or swiglu
                               or not norm_fits(m, n, k, fmt, exact, x.device)):
        raise ValueError(f"a norm epilogue runs only in the fast-mode decode GEMV; {fmt} "
                         f"[{m} x {k}] @ [{n} x {k}]^T (exact={exact}, transpose={transpose}) "
                         "does not take it")
    if m == 0:
        return y
    # the mma route for plain forwards only: a requested epilogue keeps its fused kernel
    mma_ok = (config is None and not exact and not transpose and lora is None and not swiglu
              and norm is None and mma_operands_fit(x, fmt, shape, q, s, offset, group))
    r = Route("dot", config) if config is not None else route(m, n, k, fmt, exact, x.device,
                                                               transpose, mma_ok)
    if r.kind == "mma":
        from orbit.kernels.int4_mma import int4_mma

        return int4_mma(x, q, s, group, out=y, fmt=fmt, global_scale=global_scale)
    if r.kind == "wgmma":
        from orbit.kernels.int4_wgmma import int4_wgmma

        return int4_wgmma(x, q, s, group, out=y, fmt=fmt, global_scale=global_scale)
    if r.kind == "dequant":
        # Training sizes: the MMA-bound GEMM is faster in cuBLAS than in a loop that also
        # dequantizes; the transient BF16 weight costs one memory-bound pass (docs/kernels.md).
        w = dequantize_weight(fmt, shape, q, s, offset, global_scale, group, x.dtype)
        return torch.matmul(x, w if transpose else w.T, out=y)
    if r.kind == "gemv":
        from orbit.kernels.gemv import gemv  # gemv.py imports this module

        return gemv(x, fmt, shape, q, s, offset, global_scale, group, y, lora=lora,
                    swiglu=swiglu, norm=norm)
    cfg = r.config
    if cfg.swap and (transpose or exact):
        raise ValueError("TileConfig.swap is a fast-mode forward experiment (no transpose, "
                         "no exact mode)")
    pairs = cfg.unpack == UNPACK_PLANE_PAIRS
    problem = cfg.pairs_problem(fmt)
    if problem is None and pairs and fmt in ("nvfp4", "mxfp4"):
        # the steps read the bytes as int32 words (8 codes each, the int4 order)
        if not (q.stride(0) % 4 or q.storage_offset() % 4 or q.shape[1] % 4):
            q = q.view(torch.int32)
        elif config is None:  # a route table's tile, for a weight it cannot read: the usual
            # unpack of the same tile (same values)
            cfg = replace(cfg, unpack=-1)
            pairs = False
        else:
            problem = (f"{fmt} plane pairs read qweight as int32 words; its rows "
                       f"(stride {q.stride(0)}, offset {q.storage_offset()}) are not 4-byte "
                       "aligned")
    if problem is None and pairs and (transpose or exact):
        problem = "nibble-plane pairs run fast-mode forwards only"
    if problem:
        raise ValueError(f"TileConfig: {problem} (transpose={transpose}, exact={exact})")
    if cfg.split > 1 and (transpose or exact):
        raise ValueError(f"TileConfig.split={cfg.split} runs in fast-mode forwards only (no "
                         "transpose, no exact mode)")
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(out_dim, cfg.bo)
    grid = (tiles * cfg.split,)
    ws = cnt_t = y  # (unused without a split)
    if cfg.split > 1:
        from orbit.kernels.gemv import arrival_counters  # (gemv imports this module)

        ws = torch.empty((cfg.split, m, out_dim), device=x.device, dtype=torch.float32)
        cnt_t = arrival_counters(x.device, tiles)
    shrink = lora is not None and lora.a is not None  # h computed by the launch's first programs
    cnt, roles, sconst = None, None, {}
    if shrink:
        from orbit.kernels.gemv import lora_counters  # (gemv imports this module)

        cnt = lora_counters(x.device)
        # shrink programs: one row of A each below LOOP_SHRINK_DOT_MIN_M rows (the GEMV's
        # role, members of one), else one SHRINK_BM-row block each with tensor-core dots
        mp = triton.next_power_of_2(m)
        sdot = mp >= LOOP_SHRINK_DOT_MIN_M
        sbm = min(max(16, mp), SHRINK_BM) if sdot else mp
        roles = triton.cdiv(m, sbm) if sdot else lora.b[0].shape[1]
        sconst = {"SDOT": sdot, "SBM": sbm}
        grid = (grid[0] + roles,)
    largs, lconst = kernel_args(lora, x, y, cnt, shrink, shrink_programs=roles)
    lconst.update(sconst)
    if lora is not None:  # tl.dot needs K >= 16 for the delta's dot
        lconst["LRP"] = max(16, lconst["LRP"])
    _qgemm_kernel[grid](
        x, y, q, s, offset if offset is not None else s,
        global_scale if global_scale is not None else s,
        m, n, k, x.stride(0), y.stride(0), q.stride(0), s.stride(0), *largs, ws, cnt_t,
        FMT=FMT_IDS[fmt], GROUP=group, HAS_OFFSET=offset is not None, TRANS=transpose,
        BM=cfg.bm, BO=cfg.bo, BR=cfg.br, GROUP_M=cfg.group_m,
        UNPACK=cfg.unpack if cfg.unpack >= 0 else DEFAULT_UNPACK.get(fmt, 0), SWAP=cfg.swap,
        SPLIT=cfg.split, num_warps=cfg.warps, num_stages=cfg.stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg and x.is_cuda else {}),
        # the bf16x2 decode of plane pairs: CUDA, symmetric codes, bf16 scale and activations
        PASM=pairs and x.is_cuda and x.dtype == torch.bfloat16
        and (fmt == "nvfp4" or (fmt == "int4" and offset is None
                                and s.dtype == torch.bfloat16)), **lconst,
    )
    return y


def bf16_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                exact: bool = False, out: Tensor | None = None) -> Tensor:
    """Unquantized weight through the same loop (used for `exact=True`; fast mode uses cuBLAS)."""
    out_f, in_f = qw.shape
    w = qw.tensors["weight"]
    check_tensor(w, "weight", x.dtype, (out_f, in_f))
    check_activation(x, "dy" if transpose else "x", out_f if transpose else in_f, w.device)
    return launch(x, "bf16", qw.shape, w, w, None, None, 0, transpose, exact, out)
