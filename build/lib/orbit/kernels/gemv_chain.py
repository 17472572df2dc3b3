"""The decoder MLP at decode sizes as one persistent launch: gate/up GEMV + SwiGLU, then the
down GEMV (`mlp_chain`). 4-bit plane formats (int4, nvfp4, mxfp4), fast mode.

Why (docs/rollout.md, "A persistent MLP launch"): at batch 1 each decode GEMV of Qwen3-1.7B
takes 5-10 us for 1-13 MB of weights (0.7-4.4 us of bytes on the H100). A kernel that holds
the SMs across both GEMVs can start a down work item as soon as its input slice is ready,
and could fetch frozen weights before the kernel before it has finished (PDL cannot: nothing
may be read before `griddepcontrol.wait`). The launch:
- optionally (`ChainConfig.prefetch`, off: measured slower), before the PDL wait, bulk-
  prefetches into L2 the weight rows each program reads later;
- phase A: the gate/up GEMV with SwiGLU in its store (gemv.plane_tile, the separate launch's
  own tile code, PAIR), work items (column tile, K-slice) strided over the programs;
- phase B: the down GEMV on those outputs, same item scheme and split-K fix-up. Each down
  item waits for the gate/up tiles of its K-slice (`ChainConfig.dataflow`, per-slice counters)
  or all programs meet at a grid barrier first (orbit/kernels/grid_barrier.py). Both need
  every program resident: the grid is sized from the compiled kernel's occupancy.
Each work item runs exactly the separate launch's program with the same tile, split and K
order, so the output is bit for bit `gemv(swiglu=True)` followed by `gemv`, with the configs
`pick_gemv_config` gives them (what the tests check). The next layer's residual add + norm
stays a separate launch (RMSNorm.add_forward), as after the two GEMVs.

Measured (H100, session 16): isolated, slower than the two PDL launches (Qwen3-1.7B INT4
20.6 vs 16.8 us); in the engine, +2.7% batch-1 decode (783 vs 762 tok/s), so the engine takes
it for INT4 at batch 1 (CHAIN_FORMATS, CHAIN_MAX_M). docs/benchmarks.md has the rows.

Triton's interpreter runs programs one after another, where a waiting program would wait
forever; there (and as a GPU reference, `ChainConfig(fused=False)`) the same kernel runs as
two launches, PHASE 1 then PHASE 2, with the synchronization compiled out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels import gemv as gemv_mod
from orbit.kernels._qgemm import FMT_IDS
from orbit.kernels._triton import tl, triton
from orbit.kernels.gemv import (
    PLANE_FORMATS,
    GemvConfig,
    _as_words,
    arrival_counters,
    gemv,
    num_sms,
    pick_gemv_config,
    plane_code,
    plane_tile,
    preload_steps,
    split_k_launch,
    tile_slice,
)
from orbit.kernels.grid_barrier import (
    SPIN_LIMIT,
    Residency,
    barrier_words,
    grid_barrier,
    resident_programs,
)
from orbit.kernels.lora_epilogue import LoRAEpilogue, kernel_args, lora_shrink_role
from orbit.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_launch, prefetch_l2
from orbit.quant.qweight import QuantizedWeight

# What the engine sends here: rows (decode batch) and formats where the chain measured faster
# than the two launches (H100, session 16, docs/benchmarks.md): INT4 at batch 1. NVFP4 at
# batch 1 runs 8-row 1-warp tiles, 1536 work items a phase, and measured slower (2048x6144:
# 29.3 vs 22.9 us); MXFP4 is not measured. `mlp_chain` itself takes all three.
CHAIN_MAX_M = 1
CHAIN_FORMATS = ("int4",)
# With adapters active (RL rollouts), the decode groups' LoRA epilogues inside the chain
# (LoRALinear.mlp_chain_with). Written and checked bit for bit under the interpreter and
# compiled for sm_90 (session 16), not yet run on a GPU: off until it is measured there.
CHAIN_LORA = False


@dataclass(frozen=True)
class ChainConfig:
    """fused: one persistent launch (CUDA); False: PHASE 1 and PHASE 2 as two launches (the
    interpreter always). prefetch: L2 bulk prefetch before the PDL wait (0 none, 1 the down
    weights, 2 the gate/up weights too). programs: cap on the grid (0: one program per work
    item of the larger phase, or as many as are resident at once if fewer)."""

    fused: bool = True
    # (defaults: the fastest form measured, H100 session 16: bulk L2 prefetch slower in every
    # form, the dataflow counters in the separate launches' order faster than the barrier)
    prefetch: int = 0
    programs: int = 0
    sleep_ns: int = 0  # grid_barrier's back-off between reads of the generation word
    grid_order: bool = True  # work items in the separate launches' grid order (see _phase)
    # per-K-slice readiness counters instead of the grid barrier, where the gate/up GEMV is
    # unsplit and its tiles fall in whole down K-slices (else the barrier)
    dataflow: bool = True
    # Before the PDL wait, into registers (frozen weights: no hazard with the kernel before;
    # without LoRA only): the first w_preload (0-2) K steps of this program's first phase-A
    # item, as GemvConfig.w_preload, and the first preload_down (0-2) of its first phase-B
    # item. Registers (offline sm_90 compile, Triton 3.9): 141 without, 154 / 155 with one /
    # two phase-A steps, 203 with one phase-B step, 231 with one of each: a phase-B step
    # stays live through phase A, which costs resident programs.
    w_preload: int = 0
    preload_down: int = 0


@triton.jit
def _item(t, T, SPLIT, GRID_ORDER: tl.constexpr):
    """Work item t's (column tile, K-slice): tile t // SPLIT, slice t % SPLIT (consecutive
    programs take the slices of one tile), or with GRID_ORDER tile t % T, slice t // T (the
    separate launch's grid order: consecutive programs take adjacent tiles)."""
    if GRID_ORDER:
        return t % T, t // T
    else:
        return t // SPLIT, t % SPLIT


@triton.jit
def _prefetch_rows(q_ptr, stride_q, N, K, K_PER, SPLIT, T, pid, P, BN: tl.constexpr,
                   PAIR: tl.constexpr, GRID_ORDER: tl.constexpr):
    """This program's weight rows of one phase (items pid, pid + P, ...) into L2."""
    for t in range(pid, T * SPLIT, P):
        pid_n, pid_k = _item(t, T, SPLIT, GRID_ORDER)
        k_lo, k_hi, offs_n, row_ok = tile_slice(pid_n, pid_k, K_PER, K, N, BN, False, PAIR,
                                                N // 2)
        rows = tl.where(row_ok, offs_n, 0) * stride_q
        prefetch_l2(q_ptr + rows + k_lo // 8, tl.where(row_ok, (k_hi - k_lo) // 2, 0))


@triton.jit
def _phase(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, K_PER, SPLIT,
           T, pid, P, stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym,
           sync_ptr, SLICE, HB_A, lh, a0, a1, a2, b0, b1, b2, LN0, LN1, LR, lscale, stride_lm,
           hc, LSR, FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
           HAS_OFFSET: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
           STAGES: tl.constexpr, FIXUP: tl.constexpr, DEFER: tl.constexpr, ASM: tl.constexpr,
           XPRE: tl.constexpr, PAIR: tl.constexpr, GRID_ORDER: tl.constexpr,
           SYNC: tl.constexpr, SPIN: tl.constexpr, LORA: tl.constexpr, LRP: tl.constexpr,
           SBK: tl.constexpr, w0, s0, o0, w1, s1, o1, WPRE: tl.constexpr):
    """One GEMV's work items t = pid, pid + P, ...: with LORA (members of a LoRA epilogue
    whose h this launch computes, as the separate launch's shrink programs do), items
    0..LSR-1 are shrink rows (lora_epilogue.lora_shrink_role: h row t), the others the
    column-tile items (_item), each the separate launch's program (gemv.plane_tile, no norm;
    its store waits for the shrink rows, lora_await_delta). A program takes its items in
    increasing t, so every shrink row is done or in progress before any tile waits on it.
    SYNC (the dataflow form, see _mlp_chain_kernel): 1, after each tile item, signal the
    phase-B K-slice (of SLICE columns) its SwiGLU outputs fall in; 2, before each tile item,
    wait for its K-slice's HB_A-column producers (a shrink row: for every slice), and after
    it count itself as a reader (the last re-arms both words). WPRE (no LoRA): item pid's
    first WPRE K steps were loaded before the PDL wait (w0, s0, o0 and w1, s1, o1;
    _first_steps_loads)."""
    NS = 0
    if LORA > 0:
        NS = LSR
    start = pid
    if WPRE:
        if pid < T * SPLIT:
            _tile_item(pid, x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K,
                       K_PER, SPLIT, T, stride_xm, stride_om, stride_os, stride_q, stride_s,
                       stride_ym, sync_ptr, SLICE, HB_A, lh, b0, b1, b2, LN0, LN1, LR, lscale,
                       stride_lm, hc, LSR, FMT, CODE, GROUP, HAS_OFFSET, MP, BN, NG, STAGES,
                       FIXUP, DEFER, ASM, XPRE, PAIR, GRID_ORDER, SYNC, SPIN, LORA, LRP, w0, s0,
                       o0, w1, s1, o1, WPRE)
        start = pid + P
    for t in range(start, NS + T * SPLIT, P):
        if LORA > 0:  # (a constexpr test first: without LoRA no shrink code is compiled)
            if t < NS:
                if SYNC == 2:  # the row reads all of x: every slice's producers
                    for k in range(SPLIT):
                        lo = k * K_PER
                        _await_count(sync_ptr + k,
                                     tl.cdiv(tl.minimum(lo + K_PER, K) - lo, HB_A),
                                     sync_ptr - 1, SPIN)
                lora_shrink_role(t, x_ptr, stride_xm, M, K, a0, a1, a2, lh, stride_lm, hc, LR,
                                 LSR, LORA, MP, SBK)
            else:
                _tile_item(t - NS, x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr,
                           M, N, K, K_PER, SPLIT, T, stride_xm, stride_om, stride_os, stride_q,
                           stride_s, stride_ym, sync_ptr, SLICE, HB_A, lh, b0, b1, b2, LN0, LN1,
                           LR, lscale, stride_lm, hc, LSR, FMT, CODE, GROUP, HAS_OFFSET, MP, BN,
                           NG, STAGES, FIXUP, DEFER, ASM, XPRE, PAIR, GRID_ORDER, SYNC, SPIN,
                           LORA, LRP, 0, 0.0, 0.0, 0, 0.0, 0.0, 0)
        else:
            _tile_item(t, x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K,
                       K_PER, SPLIT, T, stride_xm, stride_om, stride_os, stride_q, stride_s,
                       stride_ym, sync_ptr, SLICE, HB_A, lh, b0, b1, b2, LN0, LN1, LR, lscale,
                       stride_lm, hc, LSR, FMT, CODE, GROUP, HAS_OFFSET, MP, BN, NG, STAGES,
                       FIXUP, DEFER, ASM, XPRE, PAIR, GRID_ORDER, SYNC, SPIN, LORA, LRP, 0,
                       0.0, 0.0, 0, 0.0, 0.0, 0)


@triton.jit
def _tile_item(t, x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, K_PER,
               SPLIT, T, stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym,
               sync_ptr, SLICE, HB_A, lh, b0, b1, b2, LN0, LN1, LR, lscale, stride_lm, hc, LSR,
               FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
               HAS_OFFSET: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
               STAGES: tl.constexpr, FIXUP: tl.constexpr, DEFER: tl.constexpr,
               ASM: tl.constexpr, XPRE: tl.constexpr, PAIR: tl.constexpr,
               GRID_ORDER: tl.constexpr, SYNC: tl.constexpr, SPIN: tl.constexpr,
               LORA: tl.constexpr, LRP: tl.constexpr, w0, s0, o0, w1, s1, o1,
               WPRE: tl.constexpr):
    """Column-tile work item t of one GEMV (see _phase); WPRE: its first K steps' operands
    are w0, s0, o0 (and w1, s1, o1)."""
    pid_n, pid_k = _item(t, T, SPLIT, GRID_ORDER)
    k_lo, k_hi, offs_n, row_ok = tile_slice(pid_n, pid_k, K_PER, K, N, BN, False, PAIR, N // 2)
    if SYNC == 2:
        need = tl.cdiv(k_hi - k_lo, HB_A)
        _await_count(sync_ptr + pid_k, need, sync_ptr - 1, SPIN)  # (bar_ptr + 2)
    # (the norm operands are unused with NORM = False: s_ptr, cnt_ptr, 0)
    plane_tile(x_ptr, out_ptr, q_ptr, s_ptr, o_ptr, g_ptr, y_ptr, cnt_ptr, M, N, K, SPLIT,
               stride_xm, stride_om, stride_os, stride_q, stride_s, stride_ym, lh, b0, b1, b2,
               LN0, LN1, LR, lscale, stride_lm, hc, LSR, N // 2, pid_n, pid_k, k_lo, k_hi,
               offs_n, row_ok, s_ptr, s_ptr, s_ptr, s_ptr, cnt_ptr, 0, 0.0, FMT, CODE, GROUP,
               HAS_OFFSET, MP, BN, NG, STAGES, FIXUP, DEFER, ASM, XPRE, LORA, LRP, LORA > 0,
               PAIR, False, 16, w0, s0, o0, w1, s1, o1, WPRE)
    if SYNC == 1:  # (unsplit: this item stored its SwiGLU outputs)
        tl.debug_barrier()
        tl.atomic_add(sync_ptr + (pid_n * (BN // 2)) // SLICE, 1, sem="release")
    if SYNC == 2:
        tl.debug_barrier()
        read = tl.atomic_add(sync_ptr + SLICES_MAX + pid_k, 1, sem="acq_rel")
        if read == T - 1:  # every tile has read this slice: re-arm for the next launch
            tl.atomic_xchg(sync_ptr + pid_k, 0, sem="relaxed")
            tl.atomic_xchg(sync_ptr + SLICES_MAX + pid_k, 0, sem="relaxed")


# Dataflow words: SLICES_MAX "producers done" counters, then SLICES_MAX "readers done".
SLICES_MAX = tl.constexpr(32)


@triton.jit
def _first_steps_loads(q_ptr, s_ptr, o_ptr, pid, N, K, K_PER, SPLIT, T, stride_q, stride_s,
                       FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
                       HAS_OFFSET: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr,
                       PAIR: tl.constexpr, GRID_ORDER: tl.constexpr, STEPS: tl.constexpr):
    """gemv.preload_steps of work item pid's K-slice (nothing loaded, all masked, if pid is
    past the last item: its K-slice starts past K)."""
    pid_n, pid_k = _item(pid, T, SPLIT, GRID_ORDER)
    k_lo, k_hi, offs_n, row_ok = tile_slice(pid_n, pid_k, K_PER, K, N, BN, False, PAIR, N // 2)
    return preload_steps(q_ptr, s_ptr, o_ptr, offs_n, row_ok, stride_q, stride_s, k_lo, k_hi,
                         K, FMT, CODE, GROUP, HAS_OFFSET, NG, STEPS)


@triton.jit
def _await_count(ptr, need, flag_ptr, SPIN: tl.constexpr):
    """Spin (acquire) until *ptr >= need, at most SPIN reads; then go on and set *flag_ptr (the
    barrier's timeout word: a wrong result the host can detect, not a hung GPU)."""
    done = tl.atomic_add(ptr, 0, sem="acquire")
    spins = 0
    while (done < need) & (spins < SPIN):
        done = tl.atomic_add(ptr, 0, sem="acquire")
        spins += 1
    if done < need:
        tl.atomic_xchg(flag_ptr, 1, sem="relaxed")
    tl.debug_barrier()


@triton.jit(do_not_specialize=["P"])
def _mlp_chain_kernel(x_ptr, h_ptr, y_ptr, cnt_ptr, bar_ptr, M, P,
                      out1, q1, s1, o1, g1, N1, K1, KPER1, SPLIT1, T1, stride_o1m, stride_o1s,
                      stride_q1, stride_s1,
                      out2, q2, s2, o2, g2, N2, K2, KPER2, SPLIT2, T2, stride_o2m, stride_o2s,
                      stride_q2, stride_s2, stride_xm, stride_hm, stride_ym,
                      lh1, a01, a11, a21, b01, b11, b21, LN01, LN11, LR1, lscale1, stride_l1m,
                      hc1, LSR1,
                      lh2, a02, a12, a22, b02, b12, b22, LN02, LN12, LR2, lscale2, stride_l2m,
                      hc2, LSR2,
                      FMT: tl.constexpr, CODE: tl.constexpr, GROUP: tl.constexpr,
                      HAS_OFFSET: tl.constexpr, MP: tl.constexpr, STAGES: tl.constexpr,
                      ASM: tl.constexpr, BN1: tl.constexpr, NG1: tl.constexpr,
                      FIX1: tl.constexpr, DEFER1: tl.constexpr, XPRE1: tl.constexpr,
                      BN2: tl.constexpr, NG2: tl.constexpr, FIX2: tl.constexpr,
                      DEFER2: tl.constexpr, XPRE2: tl.constexpr, PHASE: tl.constexpr,
                      PREFETCH: tl.constexpr = 0, PDL: tl.constexpr = False,
                      SPIN: tl.constexpr = 1 << 24, SLEEP: tl.constexpr = 0,
                      GRID_ORDER: tl.constexpr = False, DATAFLOW: tl.constexpr = False,
                      LORA1: tl.constexpr = 0, LRP1: tl.constexpr = 1, SBK1: tl.constexpr = 16,
                      LORA2: tl.constexpr = 0, LRP2: tl.constexpr = 1, SBK2: tl.constexpr = 16,
                      WPRE: tl.constexpr = 0, WPRE_B: tl.constexpr = 0):
    # PHASE 0: both phases in one launch (every program resident: the launch sizes P for
    # that), phase B after a grid barrier, or with DATAFLOW (phase A unsplit) each phase-B item
    # as soon as the phase-A tiles of its K-slice have stored (per-slice counters in
    # bar_ptr + 3: fewer programs on each word than the barrier's one, and a program that
    # finishes phase A early starts phase B); 1 or 2: that phase alone (the interpreter, the
    # GPU reference). h = silu(x @ Wg^T) * (x @ Wu^T) [M, N1 / 2]; y = h @ Wd^T [M, N2].
    pid = tl.program_id(0)
    if PREFETCH >= 1:  # frozen weights: no dependence on the kernel before, so before the wait
        _prefetch_rows(q2, stride_q2, N2, K2, KPER2, SPLIT2, T2, pid, P, BN2, False, GRID_ORDER)
    if PREFETCH >= 2:
        _prefetch_rows(q1, stride_q1, N1, K1, KPER1, SPLIT1, T1, pid, P, BN1, True, GRID_ORDER)
    # (ChainConfig.w_preload / preload_down: WPRE / WPRE_B steps of the first items)
    wa, sa, oa, wa1, sa1, oa1 = _first_steps_loads(
        q1, s1, o1, pid, N1, K1, KPER1, SPLIT1, T1, stride_q1, stride_s1, FMT, CODE, GROUP,
        HAS_OFFSET, BN1, NG1, True, GRID_ORDER, WPRE)
    wb, sb, ob, wb1, sb1, ob1 = _first_steps_loads(
        q2, s2, o2, pid, N2, K2, KPER2, SPLIT2, T2, stride_q2, stride_s2, FMT, CODE, GROUP,
        HAS_OFFSET, BN2, NG2, False, GRID_ORDER, WPRE_B)
    if PDL == 2:  # (pdl.EARLY_RELEASE: every program is resident once all have passed here)
        gdc_launch_dependents()
    if PDL:
        gdc_wait()
    flow = bar_ptr + 3
    SYNC_A: tl.constexpr = 1 if (PHASE == 0 and DATAFLOW) else 0
    SYNC_B: tl.constexpr = 2 if (PHASE == 0 and DATAFLOW) else 0
    if PHASE != 2:
        _phase(x_ptr, out1, q1, s1, o1, g1, h_ptr, cnt_ptr, M, N1, K1, KPER1, SPLIT1, T1, pid,
               P, stride_xm, stride_o1m, stride_o1s, stride_q1, stride_s1, stride_hm, flow,
               KPER2, BN1 // 2, lh1, a01, a11, a21, b01, b11, b21, LN01, LN11, LR1, lscale1,
               stride_l1m, hc1, LSR1, FMT, CODE, GROUP, HAS_OFFSET, MP, BN1, NG1, STAGES, FIX1,
               DEFER1, ASM, XPRE1, True, GRID_ORDER, SYNC_A, SPIN, LORA1, LRP1, SBK1, wa, sa,
               oa, wa1, sa1, oa1, WPRE)
    if PHASE == 0 and not DATAFLOW:
        grid_barrier(bar_ptr, P, SPIN, SLEEP)
    # PDL: the next kernel's programs launch once all of ours have passed here, so none can
    # take a slot that one of ours still needs (all of ours were resident by then)
    if PDL and PDL != 2:
        gdc_launch_dependents()
    if PHASE != 1:
        # (phase A's fix-up counters are all re-armed before phase B: it reuses them)
        _phase(h_ptr, out2, q2, s2, o2, g2, y_ptr, cnt_ptr, M, N2, K2, KPER2, SPLIT2, T2, pid,
               P, stride_hm, stride_o2m, stride_o2s, stride_q2, stride_s2, stride_ym, flow,
               KPER2, BN1 // 2, lh2, a02, a12, a22, b02, b12, b22, LN02, LN12, LR2, lscale2,
               stride_l2m, hc2, LSR2, FMT, CODE, GROUP, HAS_OFFSET, MP, BN2, NG2, STAGES, FIX2,
               DEFER2, ASM, XPRE2, False, GRID_ORDER, SYNC_B, SPIN, LORA2, LRP2, SBK2, wb, sb,
               ob, wb1, sb1, ob1, WPRE_B)


def _operands(qw: QuantizedWeight) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, int]:
    """(int32 words, scales, offsets, global scale, group) of a 4-bit plane-format weight."""
    t = qw.tensors
    words = _as_words(t["qweight"])
    if words is None:
        raise ValueError(f"mlp_chain: the {qw.fmt} {tuple(qw.shape)} weight's bytes cannot be "
                         "viewed as int32 words (odd strides or offset)")
    gs = t["global_scale"].reshape(1) if qw.fmt == "nvfp4" else None
    group = {"nvfp4": 16, "mxfp4": 32}.get(qw.fmt, qw.group_size)
    return words, t["scale"], t.get("offset"), gs, group


def chain_operands_ok(x: Tensor, gate_up: QuantizedWeight, down: QuantizedWeight) -> bool:
    """The structural conditions of `mlp_chain`: a 2-D bf16/fp16 x of 1..16 rows on CUDA or
    under Triton's interpreter, one 4-bit plane format for both weights, matching shapes."""
    from orbit.kernels.dispatch import _fused_store_input

    (n1, k1), (n2, k2) = gate_up.shape, down.shape
    return (_fused_store_input(x) and 1 <= x.shape[0] <= 16 and gate_up.fmt == down.fmt
            and gate_up.fmt in PLANE_FORMATS and x.shape[1] == k1 and n1 == 2 * k2
            and n2 == k1)


def mlp_chain_fits(x: Tensor, gate_up: QuantizedWeight, down: QuantizedWeight,
                   max_m: int = CHAIN_MAX_M) -> bool:
    """Whether the engine's MLP runs `mlp_chain(x, gate_up, down)`: `chain_operands_ok`, at
    most max_m rows, a CHAIN_FORMATS format, both separate forwards would be the plane GEMVs
    (the gate/up one storing SwiGLU), so the chain replaces exactly those launches, and the
    default configs allow the dataflow form (the grid-barrier form measured slower in the
    engine: H100, Qwen3-1.7B INT4 batch 1, 744 vs 752 tok/s)."""
    if (not chain_operands_ok(x, gate_up, down) or x.shape[0] > max_m
            or gate_up.fmt not in CHAIN_FORMATS or not _gemv_routes(x, gate_up, down)):
        return False
    m, (n1, k1), (n2, k2) = x.shape[0], gate_up.shape, down.shape
    sms = num_sms(x.device)
    c1, c2 = (pick_gemv_config(m, n1, k1, gate_up.fmt, sms),
              pick_gemv_config(m, n2, k2, down.fmt, sms))
    group = _operands(gate_up)[4]
    return _dataflow_ok(c1, c2, k1, k2, group)


def _k_slices(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(K per slice, slices) of a GEMV split `split` ways in block_k steps, as
    gemv.split_k_launch plans it (no empty slice)."""
    k_per = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    return k_per, triton.cdiv(k, k_per)


def _dataflow_ok(c1: GemvConfig, c2: GemvConfig, k1: int, k2: int, group: int) -> bool:
    """The dataflow form's conditions: the gate/up GEMV unsplit (each tile's store is final),
    its tiles' SwiGLU columns inside whole down K-slices, at most SLICES_MAX slices."""
    _, split1 = _k_slices(k1, max(c1.block_k, group), c1.split)
    kper2, split2 = _k_slices(k2, max(c2.block_k, group), c2.split)
    return split1 == 1 and kper2 % (c1.block_n // 2) == 0 and split2 <= SLICES_MAX.value


def _gemv_routes(x: Tensor, gate_up: QuantizedWeight, down: QuantizedWeight) -> bool:
    """Both separate fast-mode forwards would be the plane GEMVs (gate/up storing SwiGLU)."""
    from orbit.kernels._qgemm import swiglu_fits, use_gemv
    from orbit.kernels.dispatch import mma_operands_ok

    m, (n1, k1), (n2, k2) = x.shape[0], gate_up.shape, down.shape
    return (swiglu_fits(m, n1, k1, gate_up.fmt, False, x.device,
                        mma_operands_ok(x, gate_up))
            and use_gemv(m, n2, k2, down.fmt, x.device, mma_operands_ok(x, down)))


def separate_mlp(x: Tensor, gate_up: QuantizedWeight, down: QuantizedWeight,
                 gemv_configs: tuple[GemvConfig, GemvConfig],
                 lora: tuple[LoRAEpilogue | None, LoRAEpilogue | None] | None = None
                 ) -> Tensor:
    """The two launches `mlp_chain` replaces, with these configs (and LoRA epilogues): the
    gate/up plane GEMV storing SwiGLU, then the down GEMV (into NaN-filled outputs: every
    element is written). The reference the tests compare the chain with, bit for bit."""
    h = x
    for qw, cfg, swiglu, epi in ((gate_up, gemv_configs[0], True, (lora or (None,))[0]),
                                 (down, gemv_configs[1], False, (lora or (None, None))[1])):
        words, s, offset, gs, group = _operands(qw)
        rows = qw.shape[0] // 2 if swiglu else qw.shape[0]
        y = torch.full((x.shape[0], rows), float("nan"), device=x.device, dtype=x.dtype)
        h = gemv(h, qw.fmt, qw.shape, words, s, offset, gs, group, y, cfg, lora=epi,
                 swiglu=swiglu)
    return h


_RESIDENT: dict[tuple, Residency] = {}  # compiled variant -> what fits at once


def chain_residency() -> list[Residency]:
    """The residency of every persistent variant compiled so far (benchmark reports)."""
    return list(_RESIDENT.values())


def mlp_chain(x: Tensor, gate_up: QuantizedWeight, down: QuantizedWeight,
              config: ChainConfig | None = None,
              gemv_configs: tuple[GemvConfig, GemvConfig] | None = None,
              lora: tuple[LoRAEpilogue | None, LoRAEpilogue | None] | None = None,
              hidden: Tensor | None = None) -> Tensor:
    """down(silu(gate(x)) * up(x)) [M, hidden] for x [M, hidden], gate_up the stacked gate/up
    weight [2 I, hidden] (gate rows first), down [hidden, I]; bit for bit the separate
    `gemv(swiglu=True)` and `gemv` launches with `gemv_configs` (default: what
    `pick_gemv_config` gives each). Only where `chain_operands_ok` and, without explicit
    `gemv_configs`, both forwards route to the plane GEMVs (ValueError otherwise).
    `lora`: (gate/up epilogue, down epilogue), either None, each with its A (this launch
    computes h, as the separate launches do): the adapters' deltas added in the stores, bit
    for bit `gemv(..., lora=)`. `hidden`: the SwiGLU output buffer [M, I] (the down
    epilogue's input; a fresh one if None)."""
    # (the engine passes no config: its preload follows the GEMVs' switch, so that one
    # bench_engine run compares both with and without it)
    cfg = config or ChainConfig(w_preload=min(gemv_mod.PDL_W_PRELOAD, 2))
    ok = chain_operands_ok(x, gate_up, down) and (gemv_configs is not None or _gemv_routes(
        x, gate_up, down))
    if not ok:
        raise ValueError(f"mlp_chain: {gate_up.fmt} {tuple(gate_up.shape)} / {down.fmt} "
                         f"{tuple(down.shape)} with x {tuple(x.shape)} {x.dtype} on {x.device} "
                         "is not a pair of plane-GEMV decode forwards")
    m = x.shape[0]
    (n1, k1), (n2, k2) = gate_up.shape, down.shape
    sms = num_sms(x.device)
    c1, c2 = gemv_configs or (pick_gemv_config(m, n1, k1, gate_up.fmt, sms),
                              pick_gemv_config(m, n2, k2, down.fmt, sms))
    if c1.warps != c2.warps or c1.stages != c2.stages:
        raise ValueError(f"mlp_chain: both GEMVs run in one launch, so they need the same warps "
                         f"and stages; got {c1} and {c2}")
    q1, s1, o1, g1, group = _operands(gate_up)
    q2, s2, o2, g2, _ = _operands(down)
    h = hidden if hidden is not None else torch.empty((m, n1 // 2), device=x.device,
                                                       dtype=x.dtype)
    if h.shape != (m, n1 // 2) or h.dtype != x.dtype or h.stride(-1) != 1:
        raise ValueError(f"mlp_chain: hidden must be [{m}, {n1 // 2}] {x.dtype}, unit column "
                         f"stride; got {tuple(h.shape)} {h.dtype}")
    epi1, epi2 = lora or (None, None)
    if any(e is not None and e.a is None for e in (epi1, epi2)):
        raise ValueError("mlp_chain: a LoRA epilogue needs its A (the launch computes h)")
    y = torch.empty((m, n2), device=x.device, dtype=x.dtype)
    bk1, bk2 = max(c1.block_k, group), max(c2.block_k, group)
    # (PAIR forces the fix-up for a split, as in gemv(swiglu=True))
    grid1, kper1, split1, out1, so1m, so1s, _, fix1 = split_k_launch(
        x, h, n1, k1, c1.block_n, bk1, c1.split, True)
    grid2, kper2, split2, out2, so2m, so2s, _, fix2 = split_k_launch(
        h, y, n2, k2, c2.block_n, bk2, c2.split, c2.fixup)
    if split2 > 1 and not fix2:
        raise ValueError("mlp_chain: a split down GEMV needs GemvConfig(fixup=True)")
    # One counter per column tile of either phase (phase A's are all re-armed before the
    # barrier, so phase B reuses them).
    cnt = arrival_counters(x.device, max(grid1[0], grid2[0]))
    fmt = gate_up.fmt
    code = plane_code(fmt, o1 is not None, c1.e2m1)
    fused = cfg.fused and x.is_cuda
    prefetch = cfg.prefetch if (x.is_cuda and k1 % 32 == 0 and k2 % 32 == 0
                                and all(q.data_ptr() % 16 == 0 and (q.stride(0) * 4) % 16 == 0
                                        for q in (q1, q2))) else 0
    words = barrier_words(x.device)
    largs1, lconst1 = kernel_args(epi1, x, h, words[67:69], epi1 is not None, n1)
    largs2, lconst2 = kernel_args(epi2, h, y, words[69:71], epi2 is not None)
    shrink_rows = (largs1[-1] if epi1 is not None else 0, largs2[-1] if epi2 is not None else 0)
    items = max(shrink_rows[0] + grid1[0] * split1, shrink_rows[1] + grid2[0] * split2)
    dataflow = cfg.dataflow and _dataflow_ok(c1, c2, k1, k2, group)
    want = min(items, cfg.programs) if cfg.programs > 0 else items
    pdl = pdl_launch(x.device, want, forced=False) if fused else {"PDL": False}
    consts = dict(FMT=FMT_IDS[fmt], CODE=code, GROUP=group, HAS_OFFSET=o1 is not None,
                  MP=triton.next_power_of_2(m), STAGES=c1.stages, ASM=x.is_cuda,
                  BN1=c1.block_n, NG1=bk1 // group, FIX1=fix1, DEFER1=c1.defer,
                  XPRE1=c1.x_prefetch, BN2=c2.block_n, NG2=bk2 // group, FIX2=fix2,
                  DEFER2=c2.defer, XPRE2=c2.x_prefetch, SLEEP=cfg.sleep_ns,
                  GRID_ORDER=cfg.grid_order, DATAFLOW=dataflow, PREFETCH=prefetch,
                  LORA1=lconst1["LORA"], LRP1=lconst1["LRP"], SBK1=lconst1["SBK"],
                  LORA2=lconst2["LORA"], LRP2=lconst2["LRP"], SBK2=lconst2["SBK"],
                  WPRE=cfg.w_preload if epi1 is None and epi2 is None else 0,
                  WPRE_B=cfg.preload_down if epi1 is None and epi2 is None else 0,
                  num_warps=c1.warps, **pdl)
    o1 = o1 if o1 is not None else s1
    o2 = o2 if o2 is not None else s2
    g1 = g1 if g1 is not None else s1
    g2 = g2 if g2 is not None else s2

    def args(p: int) -> tuple:
        return (x, h, y, cnt, words, m, p,
                out1, q1, s1, o1, g1, n1, k1, kper1, split1, grid1[0], so1m, so1s,
                q1.stride(0), s1.stride(0),
                out2, q2, s2, o2, g2, n2, k2, kper2, split2, grid2[0], so2m, so2s,
                q2.stride(0), s2.stride(0), x.stride(0), h.stride(0), y.stride(0),
                *largs1, *largs2)

    if not fused:
        # (the interpreter runs programs in order: with LoRA every item gets its own program,
        # so the shrink rows, the first programs, finish before any tile waits on them)
        p = items if lora is not None else want
        for phase in (1, 2):
            _mlp_chain_kernel[(p,)](*args(p), PHASE=phase, **consts)
        return y
    key = (x.device.index, x.dtype, tuple(sorted(consts.items())))
    resident = _RESIDENT.get(key)
    if resident is None:
        compiled = _mlp_chain_kernel.warmup(*args(1), PHASE=0, SPIN=SPIN_LIMIT, grid=(1,),
                                            **consts)
        resident = _RESIDENT[key] = resident_programs(compiled, x.device)
    if resident.programs < 1:
        raise RuntimeError(f"mlp_chain: the persistent kernel does not fit on one SM "
                           f"({resident})")
    p = min(want, resident.programs)
    _mlp_chain_kernel[(p,)](*args(p), PHASE=0, SPIN=SPIN_LIMIT, **consts)
    return y
