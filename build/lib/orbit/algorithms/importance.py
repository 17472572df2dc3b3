"""Rollout-vs-trainer importance correction: truncated IS (TIS) and masked IS (MIS).

The sampler's log-probs (`rollout_logprobs`) and the trainer's log-probs of the same tokens
under the same weights (`old_logprobs`) can differ when the engine uses different kernels.
Orbit's exact mode makes them equal, so the weights below are 1; in fast mode they correct
the off-policy gap. Both act per token on [B, T] tensors and never carry gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# exp() of a log-ratio beyond this is treated as saturated; keeps float32 finite.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class ISWeights:
    """Per-token correction to multiply into the policy-gradient loss, and the mask to AND
    into the response mask (tokens MIS drops)."""

    weights: Tensor  # [B, T] detached, 1.0 where no correction applies
    keep_mask: Tensor  # [B, T] bool
    metrics: dict[str, Tensor]


def _masked_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m = mask.bool()
    if not m.any():
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        return zero, zero, zero
    vals = x[m]
    return vals.mean(), vals.max(), vals.min()


def importance_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    response_mask: Tensor,
    tis_cap: float | None = None,
    mis_low: float | None = None,
    mis_high: float | None = None,
    mis_level: str = "token",
) -> ISWeights:
    """ratio_t = exp(old_logp_t - rollout_logp_t).

    TIS (tis_cap = C): weight_t = min(ratio_t, C).
    MIS (mis_low/mis_high): tokens with ratio_t outside [lo, hi] are masked out; with
    mis_level="sequence" one such token masks its whole sequence (a veto).
    Metrics: is_ratio_mean/max/min over response tokens, tis_clipfrac (fraction of tokens
    where ratio > C), mis_maskfrac (fraction of response tokens dropped).
    """
    if old_logprobs.shape != rollout_logprobs.shape or old_logprobs.shape != response_mask.shape:
        raise ValueError(
            "old_logprobs, rollout_logprobs, response_mask must share [B, T]; got "
            f"{tuple(old_logprobs.shape)}, {tuple(rollout_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    if mis_level not in ("token", "sequence"):
        raise ValueError(f"mis_level must be 'token' or 'sequence', got {mis_level!r}")
    if tis_cap is not None and tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    mask = response_mask.bool()
    fmask = mask.to(old_logprobs.dtype)
    n_tok = fmask.sum().clamp(min=1)
    log_ratio = (old_logprobs.detach() - rollout_logprobs.detach()).clamp(
        -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    ratio = torch.exp(log_ratio)  # [B, T]
    mean, mx, mn = _masked_stats(ratio, mask)
    metrics: dict[str, Tensor] = {"is_ratio_mean": mean, "is_ratio_max": mx, "is_ratio_min": mn}

    weights = torch.ones_like(ratio)
    if tis_cap is not None:
        weights = torch.clamp(ratio, max=tis_cap)
        metrics["tis_clipfrac"] = ((ratio > tis_cap).to(fmask.dtype) * fmask).sum() / n_tok

    keep = mask.clone()
    if mis_low is not None or mis_high is not None:
        lo = -float("inf") if mis_low is None else mis_low
        hi = float("inf") if mis_high is None else mis_high
        if lo >= hi:
            raise ValueError(f"mis_low ({mis_low}) must be < mis_high ({mis_high})")
        inside = (ratio >= lo) & (ratio <= hi)
        if mis_level == "sequence":
            # A sequence survives only if every response token is inside the band.
            inside = (inside | ~mask).all(dim=-1, keepdim=True).expand_as(mask)
        keep = mask & inside
        metrics["mis_maskfrac"] = (mask & ~keep).to(fmask.dtype).sum() / n_tok
    # where(), not a multiply: padding may hold NaN/inf and must come out as exactly 0.
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    return ISWeights(weights=weights, keep_mask=keep, metrics=metrics)
