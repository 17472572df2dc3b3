"""Per-token KL(pi || pi_ref) estimators from the log-probs of the sampled tokens.

Orbit's reference policy is the same model with the adapter switched off, so `ref_logprobs`
is cheap; these estimators turn the two log-probs of one sampled token into a KL sample
(Schulman, "Approximating KL divergence"). Used as a loss term (losses.py) or as a per-token
reward penalty (advantages.reinforce_plus_plus_advantages).
"""

from __future__ import annotations

import torch
from torch import Tensor

# verl clamps the low-variance estimator to this range so one extreme token cannot blow up
# the loss; we do the same for k3.
K3_CLAMP = 10.0

KL_ESTIMATORS = ("k1", "k2", "k3")
_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL sample, same shape as the inputs ([B, T] or [N]).

    With d = logprobs - ref_logprobs (log pi/pi_ref of the sampled token, sampled from pi):
      k1 = d                          unbiased, high variance, can be negative
      k2 = d^2 / 2                    biased, low variance, gradient = grad of KL for small d
      k3 = exp(-d) - 1 + d            unbiased, low variance, always >= 0 (clamped to +-10)
    Aliases (verl names): kl -> k1, mse -> k2, low_var_kl -> k3.
    """
    name = _ALIASES.get(estimator, estimator)
    if name not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl estimator {estimator!r}; expected one of {KL_ESTIMATORS} or {sorted(_ALIASES)}"
        )
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    d = logprobs - ref_logprobs
    if name == "k1":
        return d
    if name == "k2":
        return 0.5 * d.square()
    neg = -d
    return torch.clamp(torch.exp(neg) - neg - 1.0, min=-K3_CLAMP, max=K3_CLAMP)


def kl_shaped_rewards(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tensor:
    """Token-level rewards with a KL penalty: r_t = -kl_coef * KL_t on every response token,
    plus the sequence reward `rewards[B]` on the last one. Inputs are detached. -> [B, T]."""
    kl = kl_estimate(logprobs.detach(), ref_logprobs.detach(), estimator)
    out = torch.where(response_mask.bool(), -kl_coef * kl, torch.zeros_like(kl))  # NaN-safe padding
    lengths = response_mask.bool().sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    out[rows, lengths[rows] - 1] += rewards[rows].to(out.dtype)
    return out
