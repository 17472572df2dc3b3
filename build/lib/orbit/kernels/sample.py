"""Inverse-CDF sampling of untruncated rows in two launches, for the engine's decode step.

The torch path of `orbit.rollout.sampling.sample` for a row without top-k/top-p/min-p is a
softmax, a CDF, a searchsorted, a gather and an argmax: about 20 launches, most of the time in
torch's softmax, which gives one 152k row to a single CTA. Here the row is cut into
CHUNK-wide pieces so that one row still spreads over the whole GPU. H100, Qwen3's vocab,
GPU time replayed in a CUDA graph, `sample_rows_reference` (the same steps in torch) -> this
kernel: 65 -> 7 us at B = 1, 257 -> 8 us at B = 7, 407 -> 23 us at B = 64.

- pass 1, one program per (row, chunk): the chunk's max of z = logits / t, its sum of
  exp(z - chunk max), and the index of its first max;
- pass 2, one program per row: rescales the chunk sums to the row max M (two-level softmax),
  finds the chunk whose running mass first exceeds u * total, and scans only that chunk.

Why two launches and not one: a single launch needs the last-arriving program of a row to do
pass 2 (arrival counters, as gemv's split-K fix-up): a counter buffer to keep zeroed and a
memory fence, to save one launch of a few microseconds. Not worth it yet.

Semantics (the reference, `sample_rows_reference`, is the same formula in torch): token = the
first index i whose cumulative mass sum_{j<=i} exp(z_j - M) exceeds u * sum_j exp(z_j - M);
never a token of zero mass (a rounding shortfall takes the chunk's last token of positive
mass; anything else falls back to the row's first argmax). Sums run in float32 in another
order than torch's, so a token can differ from the torch path's where u * total lies within
rounding of a CDF boundary; the distribution is the same. CHUNK and the launch configs are
fixed (never chosen from B), and each program reads one row only, so a row's token is a
deterministic function of (row, t, u) alone, whatever else is in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.matmul_exact import interpreting
from orbit.kernels.pdl import pdl_enter, pdl_launch

# orbit.rollout.sampling's counter mixer, repeated here (kernels do not import the rollout
# package); tests/unit/test_kernels_sample.py checks the two agree bit for bit.
MIX_C1, MIX_C2 = tl.constexpr(0x7FEB352D), tl.constexpr(0x1B873593)
MIX_GOLD = tl.constexpr(0x1E3779B9)

# 1024 floats per program: 149 programs for one 151936-wide row (more than an H100's 132 SMs)
# and a one-chunk scan of 1024 in pass 2. H100 at V = 151936, chunk 512 / 1024 / 2048 / 4096:
# 6.4 / 7.1 / 8.9 / 12.8 us at B = 1, 27.3 / 22.7 / 23.0 / 28.7 us at B = 64. Fixed for every
# B: the summation order (hence the token at a rounding boundary) must not depend on it.
CHUNK = 1024


@triton.jit
def _temperature(t_ptr, row, KEYED: tl.constexpr):
    """The row's temperature; keyed launches map t <= 0 (greedy rows, overwritten by the
    caller) to 1, as the torch path's `where(t > 0, t, 1)`."""
    t = tl.load(t_ptr + row)
    if KEYED:
        t = tl.where(t > 0, t, 1.0)
    return t


@triton.jit
def _mix32(x):
    """orbit.rollout.sampling._mix_t on uint32 (the products wrap mod 2^32 as its masks do)."""
    x = x ^ (x >> 16)
    x = x * MIX_C1
    x = x ^ (x >> 15)
    x = x * MIX_C2
    return x ^ (x >> 16)


@triton.jit
def _counter_uniform(key_ptr, step_ptr, row):
    """orbit.rollout.sampling.counter_uniform for one row, bit for bit: u in (0, 1)."""
    key = tl.load(key_ptr + row).to(tl.uint32)  # keys lie in [0, 2^32)
    step = tl.load(step_ptr + row).to(tl.uint32)  # steps & 0xFFFFFFFF
    x = _mix32(key ^ _mix32(step))
    x = _mix32(x + MIX_GOLD)  # (wraps mod 2^32 as the torch path's mask)
    return ((x >> 9).to(tl.float32) + 0.5) * (2.0**-23)


@triton.jit
def _chunk_stats_kernel(x_ptr, t_ptr, m_ptr, s_ptr, a_ptr, V, stride_x, NC,
                        CHUNK: tl.constexpr, PDL: tl.constexpr = False,
                        KEYED: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < V, other=float("-inf"))
    z = tl.div_rn(x.to(tl.float32), _temperature(t_ptr, row, KEYED))  # as torch's `/`
    m = tl.max(z, 0)
    # A chunk of only -inf logits (masked vocab) has sum 0, not exp(-inf - -inf) = NaN.
    s = tl.sum(tl.exp(z - tl.where(m == float("-inf"), 0.0, m)), 0)
    a = tl.argmax(z, 0, tie_break_left=True)  # first max, as torch.argmax
    out = row * NC + c
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, s)
    tl.store(a_ptr + out, c * CHUNK + a)


@triton.jit
def _pick_kernel(x_ptr, t_ptr, u_ptr, m_ptr, s_ptr, a_ptr, tok_ptr, V, stride_x, NC,
                 CHUNK: tl.constexpr, NC_BLOCK: tl.constexpr, PDL: tl.constexpr = False,
                 KEYED: tl.constexpr = False, step_ptr=None, lp_ptr=None,
                 LOGP: tl.constexpr = False):
    # KEYED: u_ptr holds the rows' counter keys and step_ptr their steps; u is derived here
    # (orbit.rollout.sampling.counter_uniform) instead of ~25 torch launches per decode step.
    # LOGP (with KEYED): greedy rows (t <= 0) take the row's first argmax, and lp_ptr gets
    # each row's log-prob of its token at the kernel's temperature (1 for greedy rows):
    # z_tok - M - log(sum_j exp(z_j - M)) from the pass-1 sums, no [B, V] log-softmax.
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    t = _temperature(t_ptr, row, KEYED)
    if KEYED:
        u = _counter_uniform(u_ptr, step_ptr, row)
    else:
        u = tl.load(u_ptr + row)
    cs = tl.arange(0, NC_BLOCK)
    cmask = cs < NC
    m = tl.load(m_ptr + row * NC + cs, mask=cmask, other=float("-inf"))
    s = tl.load(s_ptr + row * NC + cs, mask=cmask, other=0.0)
    M = tl.max(m, 0)
    w = tl.where(cmask, s * tl.exp(m - M), 0.0)  # chunk masses in units of exp(z - M)
    cum = tl.cumsum(w, 0)
    target = u * tl.sum(w, 0)
    # First chunk whose running mass exceeds the target; if rounding leaves none, the last
    # chunk with mass (u < 1, so the target lies in the row's mass).
    c_first = tl.min(tl.where(cum > target, cs, NC_BLOCK), 0)
    c = tl.minimum(c_first, tl.max(tl.where(w > 0, cs, -1), 0))
    before = tl.sum(tl.where(cs == c, cum - w, 0.0), 0)  # mass of the chunks before c
    offs = c * CHUNK + tl.arange(0, CHUNK)
    inside = (offs >= 0) & (offs < V)
    x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=float("-inf"))
    e = tl.exp(tl.div_rn(x.to(tl.float32), t) - M)  # same z as pass 1
    run = before + tl.cumsum(e, 0)
    j_first = tl.min(tl.where(run > target, offs, V), 0)
    # The chunk's recomputed mass can fall short of its pass-1 sum by rounding: then the
    # target lies at the chunk's end, i.e. its last token of positive mass.
    j = tl.minimum(j_first, tl.max(tl.where(e > 0, offs, -1), 0))
    ok = tl.sum(tl.where(offs == j, e, 0.0), 0) > 0
    # Never a zero-mass token (its log-prob would be -inf): the row's first argmax instead.
    c_max = tl.minimum(tl.min(tl.where(m == M, cs, NC_BLOCK), 0), NC - 1)
    amax = tl.load(a_ptr + row * NC + c_max)
    tok = tl.where(ok, j, amax)
    if LOGP:
        tok = tl.where(tl.load(t_ptr + row) > 0, tok, amax)  # greedy: the first argmax
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)  # NaN rows still yield an index in range
    tl.store(tok_ptr + row, tok.to(tl.int64))
    if LOGP:
        z_tok = tl.div_rn(tl.load(x_ptr + row * stride_x + tok).to(tl.float32), t)
        tl.store(lp_ptr + row, (z_tok - M) - tl.log(tl.sum(w, 0)))


def _check(logits: Tensor, temperature: Tensor, u: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample_rows: logits must be [B, V] with V > 0, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"sample_rows: logits must be floating point, got {logits.dtype}")
    B = logits.shape[0]
    for name, v in (("temperature", temperature), ("u", u)):
        if v.shape != (B,) or v.dtype != torch.float32:
            raise ValueError(f"sample_rows: {name} must be float32 [{B}], got {v.dtype} {tuple(v.shape)}")


def sample_rows_reference(logits: Tensor, temperature: Tensor, u: Tensor) -> Tensor:
    """logits [B, V], temperature [B] float32 (> 0), u [B] float32 in (0, 1) -> tokens [B]
    int64: per row the first index whose float32 cumulative softmax(logits / t) exceeds u times
    the row's total; a token of zero probability (rounding) becomes the row's argmax."""
    _check(logits, temperature, u)
    V = logits.shape[1]
    probs = torch.softmax(logits / temperature[:, None], dim=-1)  # [B, V]
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp_(max=V - 1).squeeze(1)
    return torch.where(probs.gather(1, tok[:, None]).squeeze(1) > 0, tok, probs.argmax(-1))


def sample_rows_available(logits: Tensor) -> bool:
    """The kernel runs on CUDA logits when Triton is installed."""
    return HAS_TRITON and logits.is_cuda


def sample_rows_triton(logits: Tensor, temperature: Tensor, u: Tensor, chunk: int = CHUNK,
                       steps: Tensor | None = None, logprobs: bool = False
                       ) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as `sample_rows_reference`, two launches; CUDA (or Triton's interpreter).
    `chunk` (a power of two) is for tests: results depend on it at rounding boundaries.
    With `steps` ([B] int64), `u` holds the rows' counter keys ([B] int64 in [0, 2^32)) and the
    kernel derives each row's uniform as orbit.rollout.sampling.counter_uniform(keys, steps)
    does, bit for bit; temperatures <= 0 then count as 1 (greedy rows, replaced by the caller).
    `logprobs` (with `steps`): returns (tokens, log-probs [B] float32): greedy rows take the
    row's first argmax (as `logits.argmax(-1)`), and each row's log-prob is
    log_softmax(logits / t)[token] with t = 1 for greedy rows, from the kernel's own sums
    (float32, another summation order than torch's log_softmax)."""
    keyed = steps is not None
    if logprobs and not keyed:
        raise ValueError("sample_rows: logprobs=True needs the keyed form (steps given)")
    if keyed:
        B = logits.shape[0]
        for name, v in (("keys", u), ("steps", steps)):
            if v.shape != (B,) or v.dtype != torch.int64:
                raise ValueError(f"sample_rows: {name} must be int64 [{B}], got {v.dtype} {tuple(v.shape)}")
        _check(logits, temperature, temperature)
    else:
        _check(logits, temperature, u)
    if not (HAS_TRITON and (logits.is_cuda or interpreting())):
        raise RuntimeError("sample_rows_triton needs CUDA tensors and Triton (or TRITON_INTERPRET=1)")
    assert chunk >= 16 and not chunk & (chunk - 1), chunk
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    temperature, u = temperature.contiguous(), u.contiguous()
    steps = steps.contiguous() if keyed else u
    tok = torch.empty(B, dtype=torch.int64, device=logits.device)
    lp = torch.empty(B, dtype=torch.float32, device=logits.device) if logprobs else tok
    if B == 0:
        return (tok, lp) if logprobs else tok
    NC = triton.cdiv(V, chunk)
    stats = torch.empty((2, B, NC), dtype=torch.float32, device=logits.device)  # max, sum-exp
    amax = torch.empty((B, NC), dtype=torch.int32, device=logits.device)
    pdl = pdl_launch(logits.device, B * NC)
    _chunk_stats_kernel[(B, NC)](logits, temperature, stats[0], stats[1], amax, V,
                                 logits.stride(0), NC, CHUNK=chunk, KEYED=keyed,
                                 num_warps=4, **pdl)
    _pick_kernel[(B,)](logits, temperature, u, stats[0], stats[1], amax, tok, V, logits.stride(0),
                       NC, CHUNK=chunk, NC_BLOCK=max(16, triton.next_power_of_2(NC)),
                       KEYED=keyed, step_ptr=steps, lp_ptr=lp, LOGP=logprobs, num_warps=4,
                       **pdl)
    return (tok, lp) if logprobs else tok
