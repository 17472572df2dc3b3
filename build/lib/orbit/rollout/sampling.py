"""Batched token sampling with per-request parameters and counter-based randomness.

Every row of a batch can have its own temperature / top-k / top-p / min-p / seed; one call
samples all rows with a handful of batched torch ops (no per-row Python loop).

Randomness is counter-based, not stateful: the uniform that picks row b's token is a hash of
(sequence key, step), where the key hashes (seed, request index, sample index) and step is
the index of the token being generated. Inverse-CDF sampling turns that one uniform into a
token (first index where the cumulative probability exceeds u * total mass). Hence:
- a request with a seed gets the same tokens whatever else shares its batch, however the
  scheduler interleaves it, and whether or not CUDA graphs are on (given the same logits);
- no torch.Generator state needs saving, and the ops are CUDA-graph safe;
- one uniform per row instead of a [B, V] noise tensor keeps sampling cheap.

On CUDA, rows without truncation are sampled by one two-launch Triton kernel
(orbit/kernels/sample.py) instead of the torch softmax + CDF + searchsorted chain: same
distribution, same counter-based uniform, tokens equal up to float32 summation order at CDF
boundaries. CPU runs keep the torch path (and their samples); `FUSED_SAMPLER = False` or
`sample(..., fused=False)` forces it on CUDA too.

Log-probs follow `SamplingParams.logprobs_mode`; the "scaled"/"raw" ones are computed by
`orbit.models.logprobs.logprobs_from_logits`, the function the trainer uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from orbit.kernels.sample import sample_rows_available, sample_rows_triton
from orbit.models.logprobs import logprobs_from_logits
from orbit.rollout.types import Completion, SamplingParams  # noqa: F401  (re-exported)

_M32 = 0xFFFFFFFF
# Odd multipliers below 2^31, so a 32-bit value times one stays below 2^63: the int64 torch
# ops below never overflow, and the Python and torch hashes agree bit for bit.
_C1, _C2, _GOLD = 0x7FEB352D, 0x1B873593, 0x1E3779B9


def _mix_py(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 16
    return x


def _mix_t(x: Tensor) -> Tensor:
    """The same 32-bit mixer on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def sequence_key(seed: int, request: int, sample: int) -> int:
    """32-bit key of one sample of one request; any seed >= 0 (folded to 64 bits)."""
    k = _mix_py(seed ^ _mix_py((seed >> 32) ^ _GOLD))
    k = _mix_py(k ^ _mix_py(request + _GOLD))
    return _mix_py(k ^ _mix_py(sample + 2 * _GOLD))


def counter_uniform(keys: Tensor, steps: Tensor) -> Tensor:
    """keys, steps int64 [B] -> float32 uniforms in (0, 1), a pure function of (key, step)."""
    x = _mix_t(keys ^ _mix_t(steps & _M32))
    x = _mix_t((x + _GOLD) & _M32)
    # 23 bits + 0.5 is exact in float32 and strictly inside (0, 1).
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def counter_uniform_py(key: int, step: int) -> float:
    """Host twin of `counter_uniform` (tests, debugging)."""
    x = _mix_py(key ^ _mix_py(step))
    x = _mix_py(x + _GOLD)
    return ((x >> 9) + 0.5) * (2.0**-23)


@dataclass
class SamplingBatch:
    """Per-row sampling inputs on the device plus the host facts that pick the code path."""

    temperature: Tensor  # [B] float32, 0 = greedy
    top_p: Tensor  # [B] float32
    min_p: Tensor  # [B] float32
    top_k: Tensor  # [B] int64, V where off
    keys: Tensor  # [B] int64
    steps: Tensor  # [B] int64
    greedy: list[bool]
    truncates: list[bool]
    lp_temps: list[float]  # temperature each row's log-prob is computed at (1 for raw/greedy)
    lp_zero: list[bool]  # processed log-prob of a greedy row: the point mass, 0
    lp_trunc: list[bool]  # processed log-prob renormalised over the kept tokens
    # the row's log-prob is at the temperature it samples at (1 for greedy rows): what the
    # sampler kernel can return with the token (`sample(..., fused_logprobs=True)`)
    lp_at_t: list[bool] = field(default_factory=list)


def make_batch(
    params: list[SamplingParams], keys: list[int], steps: list[int], vocab_size: int,
    device: torch.device | str,
) -> SamplingBatch:
    """Pack per-row parameters into device tensors (two host->device copies)."""
    greedy = [p.greedy for p in params]
    # greedy rows carry temperature 0 on the device: every kernel and torch path reads t <= 0
    # as greedy, and a tiny positive t (1e-40) would otherwise reach a softmax as 0/0
    fl = torch.tensor(
        [[0.0 if g else p.temperature for p, g in zip(params, greedy)], [p.top_p for p in params],
         [p.min_p for p in params]],
        dtype=torch.float32,
    ).to(device, non_blocking=True)
    ints = torch.tensor(
        [[p.top_k if p.top_k > 0 else vocab_size for p in params], keys, steps], dtype=torch.int64
    ).to(device, non_blocking=True)
    lp_temps = [
        1.0 if (p.logprobs_mode == "raw" or g) else float(p.temperature) for p, g in zip(params, greedy)
    ]
    processed = [p.logprobs_mode == "processed" for p in params]
    return SamplingBatch(
        fl[0], fl[1], fl[2], ints[0], ints[1], ints[2], greedy,
        [p.truncates for p in params], lp_temps,
        [pr and g for pr, g in zip(processed, greedy)],
        [pr and p.truncates for pr, p in zip(processed, params)],
        [g or p.logprobs_mode != "raw" or p.temperature == 1.0 for p, g in zip(params, greedy)],
    )


CDF_BLOCK = 128


def row_cdf(p: Tensor, blocked: bool | None = None) -> Tensor:
    """Inclusive cumulative sum of each row of p [B, V] (non-negative), in two levels: within
    blocks of CDF_BLOCK, then the blocks' running totals added. torch's scan over one
    152k-wide row is a single slow pass (0.24 ms per decode step at B = 64 on an H100,
    docs/benchmarks.md); two short scans are a fraction of that. Same values up to float32
    rounding order; each row is computed alone, so a row's CDF does not depend on the batch.
    blocked: None = on CUDA only (a CPU scan is sequential and cheap; CPU runs keep their
    samples)."""
    B, V = p.shape
    if blocked is None:
        blocked = p.is_cuda
    if not blocked or V <= 4 * CDF_BLOCK:
        return p.cumsum(-1)
    pad = (-V) % CDF_BLOCK
    q = torch.nn.functional.pad(p, (0, pad)) if pad else p
    inner = q.view(B, -1, CDF_BLOCK).cumsum(-1)  # [B, nb, CDF_BLOCK]
    totals = inner[:, :, -1].cumsum(-1)  # [B, nb] running total at each block's end
    offset = torch.nn.functional.pad(totals[:, :-1], (1, 0))  # mass before each block
    return (inner + offset[:, :, None]).view(B, -1)[:, :V]


def _keep_mask(sp: Tensor, b: SamplingBatch) -> Tensor:
    """sp [B, V] probabilities sorted descending -> bool [B, V] of tokens that survive."""
    V = sp.shape[1]
    rank = torch.arange(V, device=sp.device)
    keep = rank[None, :] < b.top_k[:, None]
    before = sp.cumsum(-1) - sp  # mass strictly ahead of each token
    keep &= before < b.top_p[:, None]
    keep &= sp >= b.min_p[:, None] * sp[:, :1]
    return keep  # rank 0 always survives: before=0 < top_p and min_p <= 1


# Escape hatch: False keeps CUDA runs on the torch path (comparisons, debugging).
FUSED_SAMPLER = True


def sample(logits: Tensor, b: SamplingBatch, fused: bool | None = None,
           fused_logprobs: bool = False) -> tuple[Tensor, Tensor]:
    """logits [B, V] float32 -> (tokens [B] int64, log-probs [B] float32).

    fused: sample untruncated rows with the Triton kernel where it can run (CUDA + Triton);
    None = `FUSED_SAMPLER`. The CPU always takes the torch path.
    fused_logprobs: where the kernel samples every row (no truncation) and each row's log-prob
    is at its sampling temperature, take the log-probs from the kernel's own sums instead of
    `logprobs_from_logits` (the trainer's function): no [B, V] log-softmax, the same value up
    to float32 summation order. Fast mode only: exact mode needs the trainer's bits."""
    kept: Tensor | None = None
    if (fused_logprobs and (FUSED_SAMPLER if fused is None else fused)
            and sample_rows_available(logits) and not any(b.truncates) and all(b.lp_at_t)
            and not all(b.greedy)):
        tok, lp = sample_rows_triton(logits, b.temperature, b.keys, steps=b.steps,
                                     logprobs=True)
        if any(b.lp_zero):
            lp = torch.where(torch.tensor(b.lp_zero, device=logits.device), 0.0, lp)
        return tok, lp
    if all(b.greedy):
        tok = logits.argmax(-1)
    else:
        use_kernel = (FUSED_SAMPLER if fused is None else fused) and sample_rows_available(logits)
        # Only rows that sample untruncated need the kernel; greedy ones are overwritten below.
        use_kernel = use_kernel and any(not (tr or g) for tr, g in zip(b.truncates, b.greedy))
        if use_kernel and not any(b.truncates):
            # The common RL case: the kernel derives each row's uniform from (key, step) and
            # maps t <= 0 to 1 itself (the bits of _sample_rows' kernel call, ~25 torch
            # launches fewer).
            tok = sample_rows_triton(logits, b.temperature, b.keys, steps=b.steps)
        else:
            tok, kept = _sample_rows(logits, b, use_kernel)
        if any(b.greedy):
            tok = torch.where(b.temperature > 0, tok, logits.argmax(-1))
    return tok, _logprobs(logits, tok, b, kept)


def _sample_rows(logits: Tensor, b: SamplingBatch, use_kernel: bool) -> tuple[Tensor, Tensor | None]:
    """Tokens of a batch where some rows truncate (or the kernel cannot run), with the kept
    mass of the truncating rows (None if none truncates); greedy rows' picks are arbitrary
    (the caller replaces them)."""
    V = logits.shape[1]
    kept: Tensor | None = None
    t = torch.where(b.temperature > 0, b.temperature, torch.ones_like(b.temperature))
    u = counter_uniform(b.keys, b.steps)[:, None]  # [B, 1]
    # The kernel needs no [B, V] probabilities; the torch paths below do.
    probs: Tensor | None = None  # [B, V]
    if not use_kernel or any(b.truncates):
        probs = torch.softmax(logits / t[:, None], dim=-1)
    # Rows without truncation always use the vocab-order CDF (even in a batch where other
    # rows truncate) so a seeded row's token never depends on its batch-mates.
    if use_kernel:
        # Every row goes through (a per-row function): truncating rows' picks are replaced
        # below and greedy rows' by the caller, cheaper than gathering the untruncated rows.
        tok = sample_rows_triton(logits, t, u[:, 0])
    elif not all(b.truncates):
        assert probs is not None
        cdf = row_cdf(probs)
        tok = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=V - 1).squeeze(1)
        # A rounding dip in the CDF must never yield a token of zero probability (its
        # log-prob would be -inf): fall back to the row's most likely token.
        tok = torch.where(probs.gather(1, tok[:, None]).squeeze(1) > 0, tok, probs.argmax(-1))
    if any(b.truncates):
        assert probs is not None
        sp, si = probs.sort(dim=-1, descending=True, stable=True)
        sp = sp * _keep_mask(sp, b)
        cdf = sp.cumsum(-1)
        kept = cdf[:, -1]
        r = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=V - 1)  # [B, 1] rank
        tok_t = si.gather(1, r).squeeze(1)
        if all(b.truncates):
            tok = tok_t
        else:
            tok = torch.where(torch.tensor(b.truncates, device=logits.device), tok_t, tok)
    return tok, kept


def _logprobs(logits: Tensor, tok: Tensor, b: SamplingBatch, kept: Tensor | None) -> Tensor:
    temps = sorted(set(b.lp_temps))
    if len(temps) == 1:
        lp, _ = logprobs_from_logits(logits, tok, temps[0])
    else:
        lp = torch.empty(tok.shape, dtype=torch.float32, device=logits.device)
        for T in temps:
            idx = torch.tensor([i for i, x in enumerate(b.lp_temps) if x == T], device=logits.device)
            lp[idx], _ = logprobs_from_logits(logits[idx], tok[idx], T)
    if kept is not None and any(b.lp_trunc):
        m = torch.tensor(b.lp_trunc, device=logits.device)
        lp = torch.where(m, lp - torch.log(kept), lp)
    if any(b.lp_zero):
        m = torch.tensor(b.lp_zero, device=logits.device)
        lp = torch.where(m, torch.zeros_like(lp), lp)
    return lp
