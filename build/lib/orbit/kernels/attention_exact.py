"""Attention with one reduction order for prefill, packed training and decode (exact mode).

Fast mode uses SDPA: packed training/prefill and decode run different kernels (flash vs. a
masked batched read), which reduce over the keys in different orders, so the same token's
attention output differs by rounding between the trainer and the engine. Here *one* kernel body
serves both. For every query row it walks the keys in fixed blocks of BLOCK_N positions, from
absolute position 0 upward, with an online softmax in float32 (running max, running sum,
rescaled accumulator). Blocks are aligned to positions, not to the tile, and every constexpr
(BLOCK_M, BLOCK_N, warps) is the same in both modes, so a token's output depends only on its
query and on the K/V values at positions 0..pos: packed prefill == decode over the cache, bit
for bit, given the same K/V values.

Why extra blocks are harmless: a query tile walks up to its *last* row's position; for an
earlier row those trailing blocks are fully masked, and a fully masked block is an exact no-op
(max unchanged, alpha = exp2(0) = 1, p = 0, acc*1 + 0 = acc).

Where K/V come from is only an address: `kv_base[b] + pos * stride_pos` (elements), with
- packed: K/V [T, Hkv, D], kv_base = cu_seqlens[b] * stride_t, stride_pos = stride_t;
- cached: one layer of the KV cache [S, L, Hkv, D], kv_base = slot[b] * stride_s, stride_pos =
  stride_l (the new tokens' K/V must already be written into the cache).
GQA: query head h reads KV head h // (H / Hkv). A program serves one KV head and packs the
GROUP query heads that share it into its rows: row r of a tile is token r // GROUP, head
kvh * GROUP + r % GROUP. So K/V blocks are read once per KV head instead of once per query
head, and a decode step (one token per sequence) fills GROUP rows of a tile instead of one.
A row's arithmetic is unchanged by which rows share its tile (same dot shapes, same blocks,
trailing blocks exact no-ops), so this layout gives the bits the per-head layout gave.

The torch reference (`attention_exact_reference`) computes each sequence's masked softmax in
float64 and rounds to q.dtype; it is the CPU path and the GPU kernel's accuracy check.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.matmul_exact import interpreting

BLOCK_M, BLOCK_N = 32, 64  # query rows per program, KV positions per step: fixed for all modes
NUM_WARPS, NUM_STAGES = 4, 2
LOG2E = 1.4426950408889634  # kernels take the softmax scale times log2(e) and use exp2


@triton.jit
def load_kv_block(k_base, v_base, kpos, kmask, d, dmask, stride_kpos, stride_vpos, dtype):
    """K^T [BD, BN] and V [BN, BD] at positions `kpos` (zero where not `kmask`), in `dtype`."""
    k = tl.load(k_base + kpos[None, :] * stride_kpos + d[:, None],
                mask=kmask[None, :] & dmask[:, None], other=0.0).to(dtype)
    v = tl.load(v_base + kpos[:, None] * stride_vpos + d[None, :],
                mask=kmask[:, None] & dmask[None, :], other=0.0).to(dtype)
    return k, v


@triton.jit
def softmax_kv(q, k, v, smask, qk_scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """One BLOCK_N step of the online softmax over loaded K^T/V blocks: scores kept where
    `smask` [BM, BN], running max m_i, sum l_i and accumulator acc (fp32) updated and
    returned. Shared by this kernel and the split-KV decode kernel (attention_decode.py), so
    both do a block's arithmetic in the same order whenever they load it."""
    if IEEE:  # fp32 inputs: no tf32
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)  # [BM, BN] float32
    s = tl.where(smask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p.to(q.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(q.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def softmax_block(q, k_base, v_base, kpos, kmask, smask, d, dmask, stride_kpos, stride_vpos,
                  qk_scale, m_i, l_i, acc, IEEE: tl.constexpr):
    """Load the K/V block at positions `kpos` (where `kmask`) and run `softmax_kv` on it."""
    k, v = load_kv_block(k_base, v_base, kpos, kmask, d, dmask, stride_kpos, stride_vpos, q.dtype)
    return softmax_kv(q, k, v, smask, qk_scale, m_i, l_i, acc, IEEE)


@triton.jit
def _attn_exact_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    cu_ptr, start_ptr, kvbase_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kpos, stride_kh, stride_vpos, stride_vh,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    q0 = tl.load(cu_ptr + seq).to(tl.int64)
    n = tl.load(cu_ptr + seq + 1).to(tl.int64) - q0
    m0 = tile * BLOCK_M  # first (token, head-in-group) row of the tile
    if m0 < n * GROUP:
        p0 = tl.load(start_ptr + seq).to(tl.int64)
        kvb = tl.load(kvbase_ptr + seq).to(tl.int64)
        rows = m0 + tl.arange(0, BLOCK_M)
        tok = rows // GROUP
        h = kvh * GROUP + rows % GROUP
        rmask = tok < n
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(q_ptr + (q0 + tok)[:, None] * stride_qt + h[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)  # [BM, BD]
        qpos = p0 + tok  # absolute position of each query row
        last = p0 + tl.minimum((m0 + BLOCK_M - 1) // GROUP, n - 1)  # last position any valid row may see
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        k_base = k_ptr + kvb + kvh * stride_kh
        v_base = v_ptr + kvb + kvh * stride_vh
        for start in range(0, last + 1, BLOCK_N):
            kpos = start + tl.arange(0, BLOCK_N)
            m_i, l_i, acc = softmax_block(q, k_base, v_base, kpos, kpos <= last,
                                          kpos[None, :] <= qpos[:, None], d, dmask, stride_kpos,
                                          stride_vpos, qk_scale, m_i, l_i, acc, IEEE)
        out = acc / l_i[:, None]
        tl.store(o_ptr + (q0 + tok)[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _check_q(q: Tensor, k: Tensor) -> int:
    """Validates q [T, H, D] against k [..., Hkv, D]; returns the GQA group size."""
    if q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"attention_exact: q must be [T, H, D] with a contiguous last dim, got "
                         f"shape {tuple(q.shape)} strides {q.stride()}")
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[-2]
    if k.shape[-1] != D or k.stride(-1) != 1:
        raise ValueError(f"attention_exact: K/V last dim must be D={D} and contiguous, got {tuple(k.shape)}")
    if H % Hkv:
        raise ValueError(f"attention_exact: {H} query heads are not a multiple of {Hkv} KV heads")
    return H // Hkv


def _launch(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, start: Tensor, kvbase: Tensor,
            stride_kpos: int, stride_vpos: int, max_new: int, scale: float) -> Tensor:
    group = _check_q(q, k)
    if not (HAS_TRITON and (q.is_cuda or interpreting())):
        raise RuntimeError("attention_exact Triton path needs CUDA tensors and Triton")
    T, H, D = q.shape
    out = torch.empty_like(q)
    n_seq = cu.numel() - 1
    if T == 0 or n_seq == 0:
        return out
    grid = (n_seq, triton.cdiv(max_new * group, BLOCK_M), H // group)
    _attn_exact_kernel[grid](
        q, k, v, out, cu, start, kvbase,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        stride_kpos, k.stride(-2), stride_vpos, v.stride(-2),
        scale * LOG2E,
        GROUP=group, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), IEEE=q.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def attention_exact_reference(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor,
                              scale: float | None = None) -> Tensor:
    """One sequence: q [n, H, D] at positions q_pos [n]; k/v [m, Hkv, D] at positions 0..m-1;
    query i sees keys j <= q_pos[i]. float64 softmax, result in q.dtype."""
    group = _check_q(q, k)
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qd = q.double().transpose(0, 1)  # [H, n, D]
    kd = k.to(q.dtype).double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, m, D]
    vd = v.to(q.dtype).double().repeat_interleave(group, dim=1).transpose(0, 1)
    s = (qd @ kd.transpose(1, 2)) * scale  # [H, n, m]
    keep = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos.to(q.device)[:, None]  # [n, m]
    s = s.masked_fill(~keep, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vd).transpose(0, 1).to(q.dtype)  # [n, H, D]


def _use_triton(q: Tensor) -> bool:
    return HAS_TRITON and q.is_cuda


def attention_packed_exact(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                           max_seqlen: int, scale: float | None = None,
                           force_triton: bool = False) -> Tensor:
    """Causal attention within each packed sequence. q [T, H, D], k/v [T, Hkv, D],
    cu_seqlens [N+1]; `max_seqlen` (host int) bounds the longest sequence. -> [T, H, D]."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if _use_triton(q) or force_triton:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _PackedAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
        return _packed_triton(q, k, v, cu_seqlens, max_seqlen, scale)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        pos = torch.arange(b - a, device=q.device)
        out[a:b] = attention_exact_reference(q[a:b], k[a:b], v[a:b], pos, scale)
    return out


def _packed_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                   scale: float) -> Tensor:
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    kvbase = cu[:-1].to(torch.int64) * k.stride(0)  # [N] element offset of each sequence
    start = torch.zeros_like(kvbase)
    return _launch(q, k, v, cu, start, kvbase, k.stride(0), v.stride(0), max_seqlen, scale)


class _PackedAttention(torch.autograd.Function):
    """Exact forward; backward differentiates SDPA recomputed per sequence (the same function
    up to rounding; gradients need not be batch-invariant, only forward log-probs are compared).

    The recompute is the 4-D [1, H, n, D] call fast mode trains with (`_sdpa_causal`, the
    same layout as `orbit.models.attention._sdpa`): flash / memory-efficient backward on GPU.
    A 3-D [H, n, D] call (correct, but served by SDPA's math path) made exact-mode training
    1.88x slower than fast mode. An earlier 4-D attempt gave wrong gradients; this one takes
    the upstream gradient in the [n, H, D] layout of the forward's output and is checked by
    tests/gpu/test_exact_mode.py::test_exact_mode_gradients_match_fast."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,  # type: ignore[override]
                scale: float) -> Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.bounds, ctx.scale = cu_seqlens.tolist(), scale
        return _packed_triton(q, k, v, cu_seqlens, max_seqlen, scale)

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for a, b in itertools.pairwise(ctx.bounds):
            with torch.enable_grad():
                qs, ks, vs = (t[a:b].detach().requires_grad_() for t in (q, k, v))  # [n, h, D]
                o = _sdpa_causal(qs, ks, vs, ctx.scale)  # [n, H, D], like the forward's output
                gq, gk, gv = torch.autograd.grad(o, (qs, ks, vs), dout[a:b])
            dq[a:b], dk[a:b], dv[a:b] = gq, gk, gv
        return dq, dk, dv, None, None, None


def _sdpa_causal(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """One sequence, q [n, H, D], k/v [n, Hkv, D] -> [n, H, D] through 4-D SDPA (GQA native)."""
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale,
        enable_gqa=k.shape[1] != q.shape[1])  # [1, H, n, D]
    return o[0].transpose(0, 1)


def attention_cached_exact(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens: Tensor,
                           slots: Tensor, start_pos: Tensor, max_new: int,
                           scale: float | None = None, force_triton: bool = False) -> Tensor:
    """Attention of new tokens against a KV cache layer that already holds them.

    q [T, H, D] (sequence b's tokens are rows cu_seqlens[b]..cu_seqlens[b+1]), k/v_cache
    [S, L, Hkv, D], slots/start_pos [N] int64: token i of sequence b sits at position
    start_pos[b] + i of slot slots[b] and sees positions 0..start_pos[b] + i. `max_new` (host
    int) bounds the new tokens per sequence (1 for decode). -> [T, H, D].
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"attention_cached_exact: caches must be [S, L, Hkv, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(0) != v_cache.stride(0):
        raise ValueError("attention_cached_exact: K and V caches must share their slot stride")
    if _use_triton(q) or force_triton:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        kvbase = slots.to(device=q.device, dtype=torch.int64) * k_cache.stride(0)  # [N]
        start = start_pos.to(device=q.device, dtype=torch.int64)
        return _launch(q, k_cache, v_cache, cu, start, kvbase, k_cache.stride(1), v_cache.stride(1),
                       max_new, scale)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for b, (a, e) in enumerate(itertools.pairwise(bounds)):
        s, p = int(slots[b]), int(start_pos[b])
        pos = torch.arange(p, p + e - a, device=q.device)
        ctx = p + e - a
        out[a:e] = attention_exact_reference(q[a:e], k_cache[s, :ctx], v_cache[s, :ctx], pos, scale)
    return out
