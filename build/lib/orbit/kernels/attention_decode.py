"""Split-KV decode attention (flash-decoding) for fast mode: one new token per sequence.

The exact kernel (`attention_exact`) gives a decode step one program per (sequence, KV head)
that walks every cached position in order: at batch 1 that is 8 programs on a 132-SM GPU
for Qwen3-1.7B, each a chain of dependent K-load / dot / softmax / V-load steps (~12 us per
layer on the H100 at a 200-token context, 0.33 ms of a 2.2 ms step). Here the positions
[0, pos] of each (sequence, KV head) are cut into SPLIT contiguous chunks, one program each;
every program keeps the online-softmax state of its chunk (running max m, running sum l,
unnormalized accumulator acc, float32) and writes it to a workspace. The last program of a
(sequence, KV head) to finish (an arrival counter, as in the split-K GEMV: `gemv.
arrival_counters`) combines the chunks in chunk order:
    M = max_s m_s,  w_s = 2^(m_s - M),  out = sum_s w_s acc_s / sum_s w_s l_s
so the result does not depend on which program arrives last (deterministic), and there is
no second launch. An empty chunk (past the sequence's position) has m = -inf, l = 0, acc = 0
and weighs 0.

Fast mode only: splitting changes the reduction order over keys, so a token's output is not
bit-identical to the packed/prefill kernel's; exact mode keeps `attention_exact` (the engine
passes AttnBatch(split_kv=not exact)). GQA packing as in the exact kernel: a program's rows
are the GROUP query heads of its KV head (padded to 16 rows for the dot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton
from orbit.kernels.attention_exact import LOG2E, _check_q, load_kv_block, softmax_block, softmax_kv
from orbit.kernels.gemv import arrival_counters
from orbit.kernels.pdl import L2Prefetch, l2_prefetch_args, pdl_enter, pdl_launch, prefetch_table_l2
from orbit.kernels.rope import _norm_rope_row, norm_rope_rows

SPLIT_BLOCK_N = 64  # key positions per step
SPLIT_MAX = 16  # chunks per (sequence, KV head)
SPLIT_TARGET_PROGRAMS_PER_SM = 2  # split until the grid has about this many programs per SM
SPLIT_WARPS, SPLIT_STAGES = 4, 2
# (Loading each chunk's first K/V block before the PDL wait was built in session 19 and
# removed in session 20: no change, 763.0 tok/s without and with it, H100, Qwen3-1.7B INT4
# batch 1; docs/rollout.md.)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel: key positions per step, warps, pipeline stages,
    and whether each step prefetches the next block's K/V into registers. The default is the
    engine's; scripts/bench/bench_attn_decode.py sweeps the others."""

    block_n: int = SPLIT_BLOCK_N
    warps: int = SPLIT_WARPS
    stages: int = SPLIT_STAGES
    prefetch: bool = False


def pick_splits(n_seq: int, kv_heads: int, max_context: int, sms: int,
                block_n: int = SPLIT_BLOCK_N) -> int:
    """Chunks per (sequence, KV head): enough programs to fill the SMs, at most one chunk per
    `block_n` positions of `max_context`, at most SPLIT_MAX; 1 means do not split (the
    batch already fills the GPU, or the context is one block)."""
    blocks = triton.cdiv(max(max_context, 1), block_n)
    want = triton.cdiv(SPLIT_TARGET_PROGRAMS_PER_SM * sms, max(n_seq * kv_heads, 1))
    split = max(1, min(want, blocks, SPLIT_MAX))
    return triton.cdiv(blocks, triton.cdiv(blocks, split))  # no chunk is past max_context


def pick_decode(n_seq: int, kv_heads: int, max_context: int, sms: int) -> tuple[int, DecodeConfig]:
    """(split, launch config) for a decode step, from the H200 sweep of
    scripts/bench/bench_attn_decode.py (Qwen3-1.7B heads; docs/benchmarks.md):
    - few (sequence, KV head) pairs (batch 1-7 of 8 KV heads): split the keys. When every
      chunk is one 64-position block, 4 warps at 64 positions are fastest (B=1, 320
      positions: 9.7 us); longer chunks take 32-position blocks, 4 warps and the next-block
      prefetch (B=1, 2048: 21.7 us, against 35.9 us unprefetched at 64);
    - 64-1023 pairs: 32-position blocks on 2 warps (B=64, 320: 44.6 us; the exact kernel's
      32-row tiles on 4 warps took 58.2 us, 64-position blocks on 4 warps 152 us);
    - 1024 or more: 1 warp (B=256, 2048 positions: 705 us = 73% of copy bandwidth).
    Fewer warps let more programs share an SM, and their loads are what keep HBM busy. The
    prefetch spills registers below 4 warps (10x slower there), so only the 4-warp case uses it."""
    pairs = n_seq * kv_heads
    if pairs < 64:
        split = pick_splits(n_seq, kv_heads, max_context, sms, block_n=64)
        if split == triton.cdiv(max(max_context, 1), 64):  # one block per chunk
            return split, DecodeConfig(64, 4, 2)
        cfg = DecodeConfig(32, 4, 2, prefetch=True)
    elif pairs < 1024:
        cfg = DecodeConfig(32, 2, 2)
    else:
        cfg = DecodeConfig(32, 1, 2)
    return pick_splits(n_seq, kv_heads, max_context, sms, block_n=cfg.block_n), cfg


@triton.jit
def _attn_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, acc_ptr, ml_ptr, cnt_ptr, start_ptr, slot_ptr, stride_slot,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kpos, stride_kh, stride_vpos, stride_vh,
    qk_scale, HKV, SPLIT, CHUNK,
    nk_ptr, nv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, stride_nkt, stride_nkh, stride_nvt,
    stride_nvh, stride_ct, eps, pf_addr_ptr, pf_size_ptr, PF_N,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr = False, ROPE: tl.constexpr = False, HAS_NORM: tl.constexpr = False,
    SP: tl.constexpr = 1, PF_PER: tl.constexpr = 0, PF_LANES: tl.constexpr = 128,
):
    # ROPE (the fold of orbit.kernels.rope.qk_norm_rope_kv): q_ptr holds the raw q, nk/nv_ptr
    # the new token's raw k and v [B, Hkv, D]. Every program normalises and rotates its query
    # rows itself; the program whose chunk holds the new position p0 normalises and rotates k,
    # stores k and v in the cache at p0 and then (barrier) reads them back with the rest.
    # PF_PER > 0 (pdl.L2Prefetch): this program first bulk-prefetches its share of the table
    # (frozen weights of the GEMVs after this launch) into L2, before the PDL wait (no kernel
    # writes them); a hint only, nothing waits for it, the computed bits are the same.
    if PF_PER > 0:
        prefetch_table_l2(pf_addr_ptr, pf_size_ptr, PF_N,
                          (tl.program_id(0) * HKV + tl.program_id(1)) * SPLIT + tl.program_id(2),
                          PF_PER, PF_LANES)
    pdl_enter(PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    p0 = tl.load(start_ptr + seq).to(tl.int64)  # the new token's position: it sees 0..p0
    # the slot's first element (in-kernel, not a torch multiply per layer: one launch fewer)
    kvb = tl.load(slot_ptr + seq).to(tl.int64) * stride_slot
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < GROUP
    h = kvh * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    if ROPE:  # (BLOCK_D == D: the launch requires a power-of-two head dim)
        cs = seq.to(tl.int64) * stride_ct
        if sp == p0 // (CHUNK * BLOCK_N):
            kn = _norm_rope_row(nk_ptr + seq * stride_nkt + kvh * stride_nkh, kw_ptr,
                                cos_ptr + cs, sin_ptr + cs, eps, D, HAS_NORM,
                                k_ptr.dtype.element_ty)
            tl.store(k_ptr + kvb + p0 * stride_kpos + kvh * stride_kh + d,
                     kn.to(k_ptr.dtype.element_ty))
            tl.store(v_ptr + kvb + p0 * stride_vpos + kvh * stride_vh + d,
                     tl.load(nv_ptr + seq * stride_nvt + kvh * stride_nvh + d))
            tl.debug_barrier()  # the block loads below read them from this CTA's own stores
        q = norm_rope_rows(q_ptr + seq * stride_qt, stride_qh, h, rmask, qw_ptr, cos_ptr + cs,
                           sin_ptr + cs, eps, D, HAS_NORM, q_ptr.dtype.element_ty)
        q = q.to(q_ptr.dtype.element_ty)  # rounded as the separate launch stores it
    else:
        q = tl.load(q_ptr + seq * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BM, BD]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + kvb + kvh * stride_kh
    v_base = v_ptr + kvb + kvh * stride_vh
    lo = sp.to(tl.int64) * CHUNK * BLOCK_N
    hi = tl.minimum(lo + CHUNK * BLOCK_N, p0 + 1)  # exclusive
    if PREFETCH:
        # Each step issues the next block's K/V loads before its own arithmetic, so a program
        # always has a block in flight (without it every step waits a full memory latency).
        kpos = lo + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        k, v = load_kv_block(k_base, v_base, kpos, kmask, d, dmask, stride_kpos, stride_vpos, q.dtype)
        for start in range(lo, hi, BLOCK_N):
            npos = start + BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = npos < hi  # past the chunk: masked, no traffic
            k_n, v_n = load_kv_block(k_base, v_base, npos, nmask, d, dmask, stride_kpos,
                                     stride_vpos, q.dtype)
            m_i, l_i, acc = softmax_kv(q, k, v, kmask[None, :], qk_scale, m_i, l_i, acc, IEEE)
            k, v, kmask = k_n, v_n, nmask
    else:
        for start in range(lo, hi, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            kmask = kpos < hi
            m_i, l_i, acc = softmax_block(q, k_base, v_base, kpos, kmask, kmask[None, :], d, dmask,
                                          stride_kpos, stride_vpos, qk_scale, m_i, l_i, acc, IEEE)
    if DIRECT:  # SPLIT == 1: this program saw every position, nothing to combine
        tl.store(o_ptr + seq * stride_ot + h[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    else:
        # workspace: acc [n_seq * HKV, SPLIT, BM, BD], ml [n_seq * HKV, SPLIT, 2, BM]
        tile = seq * HKV + kvh
        a_base = acc_ptr + tile * SPLIT * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + d[None, :]
        ml_base = ml_ptr + tile * SPLIT * 2 * BLOCK_M + rows
        # (only the GROUP real rows of acc: the tile's padding rows are never read)
        tl.store(a_base + sp * BLOCK_M * BLOCK_D, acc, mask=rmask[:, None])
        tl.store(ml_base + sp * 2 * BLOCK_M, m_i)
        tl.store(ml_base + sp * 2 * BLOCK_M + BLOCK_M, l_i)
        # The last chunk program to arrive combines (see the module docstring; the barrier +
        # acq_rel atomic make the other chunks' stores visible, .cg loads read them from L2).
        # Unrolled over SP >= SPLIT chunks (masked past SPLIT: m = -inf weighs 0 and adds an
        # exact +0), so the loads of every chunk are issued at once instead of one L2 round
        # trip per loop iteration; the adds stay in chunk order (the same bits).
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            m_all = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
            for s_ in tl.static_range(SP):
                live = (rows * 0 + s_) < SPLIT
                m_all = tl.maximum(m_all, tl.load(ml_base + s_ * 2 * BLOCK_M, mask=live,
                                                  other=float("-inf"), cache_modifier=".cg"))
            l_all = tl.zeros((BLOCK_M,), dtype=tl.float32)
            o = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for s_ in tl.static_range(SP):
                live = (rows * 0 + s_) < SPLIT
                m_s = tl.load(ml_base + s_ * 2 * BLOCK_M, mask=live, other=float("-inf"),
                              cache_modifier=".cg")
                w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - m_all))
                l_all += w * tl.load(ml_base + s_ * 2 * BLOCK_M + BLOCK_M, mask=live, other=0.0,
                                     cache_modifier=".cg")
                o += w[:, None] * tl.load(a_base + s_ * BLOCK_M * BLOCK_D,
                                          mask=(live & rmask)[:, None], other=0.0,
                                          cache_modifier=".cg")
            out = o / l_all[:, None]
            tl.store(o_ptr + seq * stride_ot + h[:, None] * stride_oh + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")  # re-armed for the next launch


@dataclass(frozen=True)
class DecodeRope:
    """The new token's raw k and v [B, Hkv, D] and what turns raw q and k into attention's
    inputs (per-head RMSNorm weights or None, eps, cos/sin rows [B, D]): with it,
    `attention_decode_split` takes the raw q and does q/k norm + RoPE and the cache write of
    k and v itself (`orbit.kernels.rope.qk_norm_rope_kv`'s work, one launch fewer)."""

    k: Tensor
    v: Tensor
    q_weight: Tensor | None
    k_weight: Tensor | None
    eps: float
    cos: Tensor
    sin: Tensor


def attention_decode_split(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                           start_pos: Tensor, max_context: int, split: int,
                           scale: float | None = None, config: DecodeConfig | None = None,
                           rope: DecodeRope | None = None,
                           l2_prefetch: L2Prefetch | None = None) -> Tensor:
    """q [B, H, D] (one new token per sequence, already written to the cache at start_pos),
    k/v_cache [S, L, Hkv, D] (one layer), slots/start_pos [B] int64 -> [B, H, D].
    `max_context` (host int, > every start_pos) bounds the positions read; `split` >= 1 chunks
    per (sequence, KV head), from `pick_decode` (1: one program per (sequence, KV head) that
    stores its output directly: the fast-mode decode of a batch that fills the GPU). Both are
    static under CUDA-graph capture: a chunk is cdiv(max_context, split) positions rounded up
    to blocks, and the live position only decides which chunks are empty. `scale` None:
    1/sqrt(D), as attention_cached_exact. `config` None: DecodeConfig(). `rope`: q is the raw
    q, and the kernel normalises and rotates q and k and writes k and v into the cache at
    start_pos itself (DecodeRope; a power-of-two head dim, q/k/v and cache of one dtype).
    `l2_prefetch`: byte ranges the launch prefetches into L2 first (pdl.L2Prefetch; sm_90)."""
    group = _check_q(q, k_cache)
    B, _, D = q.shape
    hkv = k_cache.shape[-2]
    if q.shape[0] != slots.numel() or start_pos.numel() != slots.numel():
        raise ValueError(f"attention_decode_split: {B} query rows for {slots.numel()} slots and "
                         f"{start_pos.numel()} positions (one new token per sequence)")
    if split < 1:
        raise ValueError(f"attention_decode_split needs split >= 1, got {split}")
    if not 0 < max_context <= k_cache.shape[1]:
        raise ValueError(f"attention_decode_split: max_context={max_context} outside "
                         f"(0, {k_cache.shape[1]}]")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    if B == 0:
        return out
    cfg = config or DecodeConfig()
    bm = max(16, triton.next_power_of_2(group))
    bd = max(16, triton.next_power_of_2(D))
    blocks = triton.cdiv(max_context, cfg.block_n)
    chunk = triton.cdiv(blocks, split)
    if split == 1:  # no workspace: the kernel's DIRECT branch never touches these
        ws = ml = cnt = out
    else:
        ws = torch.empty((B * hkv, split, bm, bd), device=q.device, dtype=torch.float32)
        ml = torch.empty((B * hkv, split, 2, bm), device=q.device, dtype=torch.float32)
        cnt = arrival_counters(q.device, B * hkv)
    slot = slots.to(device=q.device, dtype=torch.int64)
    start = start_pos.to(device=q.device, dtype=torch.int64)
    rargs = _rope_args(rope, q, k_cache, v_cache, hkv, bd)
    pf_args, pf_consts = l2_prefetch_args(l2_prefetch, B * hkv * split, start)
    _attn_decode_split_kernel[(B, hkv, split)](
        q, k_cache, v_cache, out, ws, ml, cnt, start, slot, k_cache.stride(0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        scale * LOG2E, hkv, split, chunk, *rargs, *pf_args,
        GROUP=group, D=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=cfg.block_n,
        IEEE=q.dtype == torch.float32, DIRECT=split == 1, PREFETCH=cfg.prefetch,
        ROPE=rope is not None, HAS_NORM=rope is not None and rope.q_weight is not None,
        SP=triton.next_power_of_2(split), **pf_consts,
        num_warps=cfg.warps, num_stages=cfg.stages, **pdl_launch(q.device, B * hkv * split))
    return out


def _rope_args(rope: DecodeRope | None, q: Tensor, kc: Tensor, vc: Tensor, hkv: int,
               bd: int) -> tuple:
    """The kernel's DecodeRope arguments (dummies without one), after checking the layout the
    fold needs."""
    if rope is None:
        return (q, q, q, q, q, q, 0, 0, 0, 0, 0, 0.0)
    B, _, D = q.shape
    want = (B, hkv, D)
    if (tuple(rope.k.shape) != want or tuple(rope.v.shape) != want or bd != D
            or rope.cos.shape != (B, D) or rope.sin.shape != (B, D)
            or (rope.q_weight is None) != (rope.k_weight is None)
            or not q.dtype == rope.k.dtype == rope.v.dtype == kc.dtype == vc.dtype
            or q.stride(-1) != 1 or rope.k.stride(-1) != 1 or rope.v.stride(-1) != 1):
        raise ValueError(f"attention_decode_split(rope=...): q {tuple(q.shape)} {q.dtype}, k/v "
                         f"{tuple(rope.k.shape)}/{tuple(rope.v.shape)} {rope.k.dtype}, cache "
                         f"{kc.dtype}, cos {tuple(rope.cos.shape)}: needs k/v [B, Hkv, D] of "
                         "the cache's dtype, unit-stride rows, a power-of-two D, cos/sin [B, D]")
    cos, sin = rope.cos.contiguous(), rope.sin.contiguous()
    qw = rope.q_weight if rope.q_weight is not None else q
    kw = rope.k_weight if rope.k_weight is not None else q
    return (rope.k, rope.v, qw, kw, cos, sin, rope.k.stride(0), rope.k.stride(1),
            rope.v.stride(0), rope.v.stride(1), cos.stride(0), float(rope.eps))
