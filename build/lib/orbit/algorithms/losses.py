"""Policy losses of the GRPO family: PPO clip (asymmetric, dual clip), GSPO's sequence ratio,
loss aggregation modes, KL-to-reference and entropy terms, rollout importance correction.

All per-token tensors are right-padded `[B, T]` over the *response* tokens with a
`response_mask[B, T]`; `logprobs` carries gradient, everything else is treated as constant.
`policy_loss(inputs, config) -> PolicyLossOutput(loss, metrics)`; metric names follow
verl/slime (pg_loss, pg_clipfrac, ppo_kl, kl_loss, entropy, ...) without the "actor/" prefix.
Metric values are detached 0-d tensors so the caller decides when to sync with the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from orbit.algorithms.importance import LOG_RATIO_CLAMP, importance_weights
from orbit.algorithms.kl import kl_estimate

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("ppo_clip", "gspo")
# verl clamps GSPO's log sequence ratio at 10 so exp() stays finite.
GSPO_LOG_RATIO_MAX = 10.0


@dataclass(frozen=True)
class PolicyLossInputs:
    """Per-token tensors, all [B, T] right-padded over response tokens."""

    logprobs: Tensor  # current policy, requires grad
    advantages: Tensor  # per-token advantages (sequence advantages broadcast)
    response_mask: Tensor  # bool / 0-1
    old_logprobs: Tensor | None = (
        None  # policy at rollout time; None = logprobs.detach() (on-policy)
    )
    rollout_logprobs: Tensor | None = None  # sampler's log-probs (for TIS / MIS)
    ref_logprobs: Tensor | None = None  # reference policy (adapter off) for the KL term
    entropy: Tensor | None = None  # per-token entropy of the current policy, for the bonus

    def __post_init__(self) -> None:
        shape = self.logprobs.shape
        if len(shape) != 2:
            raise ValueError(f"logprobs must be [B, T], got {tuple(shape)}")
        for name in (
            "advantages",
            "response_mask",
            "old_logprobs",
            "rollout_logprobs",
            "ref_logprobs",
            "entropy",
        ):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected logprobs' {tuple(shape)}"
                )


@dataclass(frozen=True)
class PolicyLossConfig:
    policy_loss: str = "ppo_clip"  # "ppo_clip" (token ratio) or "gspo" (sequence ratio)
    eps_clip: float = 0.2  # lower clip: ratio >= 1 - eps_clip
    eps_clip_high: float | None = None  # upper clip: ratio <= 1 + eps_clip_high (None = eps_clip)
    dual_clip_c: float | None = None  # dual clip for A < 0: loss <= -A * c (c > 1, e.g. 3)
    loss_agg_mode: str = "token-mean"
    max_response_len: int | None = None  # seq-mean-token-sum-norm constant (None = T)
    num_tokens: float | None = (
        None  # token-mean denominator over the global batch (grad accumulation)
    )
    num_seqs: float | None = None  # seq-mean denominator over the global batch
    kl_coef: float = 0.0  # > 0 adds kl_coef * KL(pi || ref) to the loss
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0  # > 0 subtracts entropy_coef * entropy (bonus)
    tis_cap: float | None = None  # TIS: weight = min(exp(old - rollout), tis_cap)
    mis_low: float | None = None  # MIS: drop tokens with ratio < mis_low
    mis_high: float | None = None  # MIS: drop tokens with ratio > mis_high
    mis_level: str = "token"  # "token" or "sequence" (one bad token drops its sequence)

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(
                f"policy_loss must be one of {POLICY_LOSSES}, got {self.policy_loss!r}"
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(
                f"loss_agg_mode must be one of {AGG_MODES}, got {self.loss_agg_mode!r}"
            )
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.eps_clip < 0 or (self.eps_clip_high is not None and self.eps_clip_high < 0):
            raise ValueError("eps_clip and eps_clip_high must be >= 0")


@dataclass
class PolicyLossOutput:
    loss: Tensor  # 0-d, differentiable
    metrics: dict[str, Tensor] = field(default_factory=dict)  # detached 0-d values


def aggregate_loss(
    loss_mat: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    max_response_len: int | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to a scalar. With m the mask, L the loss:
      token-mean              sum(L m) / sum(m)                  (DAPO; num_tokens overrides sum(m))
      seq-mean-token-sum      mean_i sum_t L m
      seq-mean-token-mean     mean_i (sum_t L m / sum_t m)       (GRPO paper)
      seq-mean-token-sum-norm mean_i sum_t L m / max_response_len (Dr. GRPO constant normalizer)
    seq-mean averages over rows with at least one token (num_seqs overrides the count) except
    -norm, which divides by the row count B: a constant, so no sample's weight depends on lengths.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m
    if mode == "token-mean":
        denom = m.sum().clamp(min=1.0) if num_tokens is None else num_tokens
        return masked.sum() / denom
    seq_sum = masked.sum(-1)  # [B]
    if mode == "seq-mean-token-sum-norm":
        norm = float(max_response_len if max_response_len is not None else loss_mat.shape[-1])
        rows = float(loss_mat.shape[0]) if num_seqs is None else num_seqs
        return seq_sum.sum() / (norm * max(rows, 1.0))
    tok = m.sum(-1)  # [B]
    present = (tok > 0).to(loss_mat.dtype)
    per_seq = seq_sum if mode == "seq-mean-token-sum" else seq_sum / tok.clamp(min=1.0)
    denom = present.sum().clamp(min=1.0) if num_seqs is None else num_seqs
    return (per_seq * present).sum() / denom


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def gspo_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence ratio s_i = exp(mean_t(logp - old_logp)) (geometric mean of the token
    ratios), written per token as log s_i,t = logp_t - sg(logp_t) + sg(log s_i): its value is
    log s_i on every token and its gradient is the token's, so summing over tokens gives the
    sequence-level gradient of the paper. Clamped at GSPO_LOG_RATIO_MAX. -> [B, T]."""
    m = mask.to(logprobs.dtype)
    lengths = m.sum(-1).clamp(min=1.0)  # [B]
    seq = ((logprobs - old_logprobs) * m).sum(-1) / lengths  # [B]
    per_tok = logprobs - logprobs.detach() + seq.detach()[:, None]
    return per_tok.clamp(max=GSPO_LOG_RATIO_MAX)


def ppo_clip_loss(
    log_ratio: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate, r = exp(log_ratio):
      L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  dual clip: L = min(L, -A c) for A < 0.
    Returns (L [B, T], boolean indicator maps for the clip-fraction metrics)."""
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(pg1, pg2)
    flags = {
        "pg_clipfrac": pg2 > pg1,
        "pg_clipfrac_high": (ratio > 1.0 + eps_high) & (advantages > 0),
        "pg_clipfrac_low": (ratio < 1.0 - eps_low) & (advantages < 0),
    }
    if dual_clip_c is not None:
        pg3 = -advantages * dual_clip_c
        neg = advantages < 0
        flags["pg_clipfrac_dual"] = (loss > pg3) & neg
        loss = torch.where(neg, torch.minimum(loss, pg3), loss)
    return loss, flags


def policy_loss(
    inputs: PolicyLossInputs, config: PolicyLossConfig | None = None
) -> PolicyLossOutput:
    """Total loss = agg(pg * is_weight) + kl_coef * agg(KL) - entropy_coef * agg(entropy)."""
    cfg = config or PolicyLossConfig()
    mask = inputs.response_mask.bool()

    def clean(t: Tensor | None) -> Tensor | None:
        # Padding may hold anything (NaN, -inf); zero it before any exp() so neither the
        # loss nor its gradient (0 * inf = NaN through a mask) can be poisoned by it.
        return (
            None
            if t is None
            else torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device))
        )

    logp = clean(inputs.logprobs)
    old = logp.detach() if inputs.old_logprobs is None else clean(inputs.old_logprobs.detach())
    adv = clean(inputs.advantages.detach().to(logp.dtype))
    rollout, ref, entropy = (
        clean(inputs.rollout_logprobs),
        clean(inputs.ref_logprobs),
        clean(inputs.entropy),
    )
    metrics: dict[str, Tensor] = {}

    is_weight = None
    if cfg.tis_cap is not None or cfg.mis_low is not None or cfg.mis_high is not None:
        if rollout is None:
            raise ValueError("tis_cap / mis_low / mis_high need PolicyLossInputs.rollout_logprobs")
        isw = importance_weights(
            old,
            rollout,
            mask,
            cfg.tis_cap,
            cfg.mis_low,
            cfg.mis_high,
            cfg.mis_level,
        )
        is_weight, mask = isw.weights.to(logp.dtype), isw.keep_mask
        metrics.update(isw.metrics)

    if cfg.policy_loss == "gspo":
        log_ratio = gspo_log_ratio(logp, old, mask)
    else:
        log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    eps_high = cfg.eps_clip if cfg.eps_clip_high is None else cfg.eps_clip_high
    pg_mat, flags = ppo_clip_loss(log_ratio, adv, cfg.eps_clip, eps_high, cfg.dual_clip_c)
    if is_weight is not None:
        pg_mat = pg_mat * is_weight

    def agg(x: Tensor) -> Tensor:
        return aggregate_loss(
            x, mask, cfg.loss_agg_mode, cfg.max_response_len, cfg.num_tokens, cfg.num_seqs
        )

    pg_loss = agg(pg_mat)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss.detach()
    for name, flag in flags.items():
        metrics[name] = masked_mean(flag.to(logp.dtype), mask).detach()
    metrics["ppo_kl"] = masked_mean(old - logp.detach(), mask)

    if ref is not None:
        kl_mat = kl_estimate(logp, ref.detach(), cfg.kl_estimator)
        kl_loss = agg(kl_mat)
        metrics["kl_loss"] = kl_loss.detach()
        if cfg.kl_coef != 0.0:
            loss = loss + cfg.kl_coef * kl_loss
    elif cfg.kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs PolicyLossInputs.ref_logprobs")

    if entropy is not None:
        ent = agg(entropy)
        metrics["entropy"] = ent.detach()
        if cfg.entropy_coef != 0.0:
            loss = loss - cfg.entropy_coef * ent
    elif cfg.entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs PolicyLossInputs.entropy")

    metrics["loss"] = loss.detach()
    return PolicyLossOutput(loss=loss, metrics=metrics)
