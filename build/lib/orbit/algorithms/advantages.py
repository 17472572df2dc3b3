"""Advantage estimators of the GRPO family, as small pure functions on tensors.

Shapes: B samples in the batch, T = padded response length. Sequence-level rewards are
`rewards[B]`; samples answering the same prompt share a `group_ids[B]` value (any ints, any
order, groups may have different sizes after filtering). Per-token tensors are `[B, T]`,
right-padded, with `response_mask[B, T]` (1 on response tokens). Every estimator is also
reachable through `ADVANTAGE_ESTIMATORS[name](inputs, config) -> advantages[B, T]`, zero
outside the mask, which is what the trainer calls. Formulas are in docs/algorithms.md.

Design choice: a group of size 1 gets advantage 0 in grpo/dr_grpo/rloo (no baseline exists,
so there is no learning signal), where verl would pass the raw reward through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.algorithms.kl import kl_estimate


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read. Only `rewards`, `group_ids`, `response_mask` are
    required; the log-prob fields are per-token `[B, T]` values of the sampled tokens."""

    rewards: Tensor  # [B] float sequence-level reward
    group_ids: Tensor  # [B] int, same value = same prompt
    response_mask: Tensor  # [B, T] bool/0-1
    old_logprobs: Tensor | None = None  # [B, T] policy that sampled (for KL shaping / OPD)
    ref_logprobs: Tensor | None = None  # [B, T] reference policy (for KL-shaped rewards)
    teacher_logprobs: Tensor | None = None  # [B, T] teacher (on-policy distillation)


@dataclass(frozen=True)
class AdvantageConfig:
    """Knobs shared by the registry entries; each estimator reads the ones it documents."""

    norm_by_std: bool = True  # grpo: divide by the group std
    eps: float = 1e-6  # added to the std before dividing
    kl_coef: float = 0.0  # reinforce++: beta of the per-token KL reward -beta * KL_t
    kl_estimator: str = "k1"  # reinforce++: estimator of KL_t (k1 / k2 / k3)
    gamma: float = 1.0  # reinforce++: discount of the token-reward returns


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..G-1 -> (index[B], G)."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids.shape)}")
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _out_dtype(rewards: Tensor) -> torch.dtype:
    """Advantages keep a float reward dtype; integer rewards give float32."""
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def _check_rewards(rewards: Tensor, group_ids: Tensor) -> None:
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(
            f"rewards must be [B] matching group_ids [B]; got rewards {tuple(rewards.shape)}, "
            f"group_ids {tuple(group_ids.shape)}"
        )


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, unbiased group std, group size), each [B], in float64.

    The std of a group of size 1 is 0 (torch.std would give NaN). A group whose rewards are
    all equal gets exactly that value as mean and std 0: sum/n can round away from the
    common value, and that rounding noise divided by its own tiny std would be a +-1 advantage.
    """
    _check_rewards(rewards, group_ids)
    idx, g = _group_index(group_ids)
    r = rewards.to(torch.float64)
    zeros = torch.zeros(g, dtype=torch.float64, device=r.device)
    count = zeros.clone().index_add_(0, idx, torch.ones_like(r))
    mean = zeros.clone().index_add_(0, idx, r) / count  # [G]
    lo = zeros.clone().scatter_reduce_(0, idx, r, "amin", include_self=False)
    hi = zeros.clone().scatter_reduce_(0, idx, r, "amax", include_self=False)
    equal = lo == hi  # [G]
    mean = torch.where(equal, lo, mean)
    sq = zeros.clone().index_add_(0, idx, (r - mean[idx]) ** 2)
    var = torch.where((count > 1) & ~equal, sq / (count - 1).clamp(min=1), torch.zeros_like(sq))
    return mean[idx], var.sqrt()[idx], count[idx]


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO: A_i = (r_i - mean_g(r)) / (std_g(r) + eps), or without the division when
    `norm_by_std=False`. std is the unbiased (n-1) group std, as in verl/TRL. -> [B]."""
    mean, std, count = group_stats(rewards, group_ids)
    adv = rewards.to(torch.float64) - mean
    if norm_by_std:
        # An all-equal group has std 0: its advantage is exactly 0 even with eps = 0.
        adv = torch.where(std > 0, adv / (std + eps), torch.zeros_like(adv))
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return adv.to(_out_dtype(rewards))


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g(r), no std division (it up-weights
    too-easy/too-hard groups). The paper's other fix, removing the 1/|o_i| length
    normalization, lives in the loss: use loss_agg_mode="seq-mean-token-sum-norm". -> [B]."""
    return grpo_advantages(rewards, group_ids, norm_by_std=False)


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """RLOO: A_i = r_i - (sum_g r - r_i) / (n - 1), the leave-one-out mean baseline;
    equivalently n/(n-1) * (r_i - mean_g). Groups of size 1 -> 0. -> [B]."""
    mean, _, count = group_stats(rewards, group_ids)
    r = rewards.to(torch.float64)
    adv = (r - mean) * count / (count - 1).clamp(min=1)
    adv = torch.where(count > 1, adv, torch.zeros_like(adv))
    return adv.to(_out_dtype(rewards))


def masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries of the whole batch; var is the
    unbiased masked variance (verl's masked_whiten). Zero outside the mask. [B, T] -> [B, T]."""
    m = mask.to(torch.float64)
    n = m.sum()
    if n < 2:
        return torch.zeros_like(values)
    # where(), not a multiply: padding may hold NaN/inf.
    x = torch.where(mask.bool(), values.to(torch.float64), 0.0)
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    return ((x - mean) * torch.rsqrt(var + eps) * m).to(values.dtype)


def outcome_token_rewards(rewards: Tensor, response_mask: Tensor) -> Tensor:
    """Place each sequence reward on its last response token -> [B, T]."""
    mask = response_mask.bool()
    lengths = mask.sum(-1)  # [B]
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    has = lengths > 0
    # Right-padded layout: the last response token of row b sits at lengths[b] - 1.
    rows = torch.nonzero(has).squeeze(-1)
    out[rows, lengths[rows] - 1] = rewards[rows]
    return out


def discounted_returns(token_rewards: Tensor, response_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{s>=t} gamma^(s-t) r_s over the response tokens. [B, T] -> [B, T]."""
    m = response_mask.to(token_rewards.dtype)
    r = torch.where(response_mask.bool(), token_rewards, torch.zeros_like(token_rewards))
    if gamma == 1.0:  # undiscounted: a reversed cumulative sum, no Python loop over T
        return r.flip(-1).cumsum(-1).flip(-1) * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + gamma * running
        out[:, t] = running
    return out * m


def reinforce_plus_plus_advantages(
    rewards: Tensor,
    response_mask: Tensor,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> Tensor:
    """REINFORCE++ (Hu 2025): token rewards r_t = -kl_coef * KL_t, plus the sequence reward on
    the last token; returns G_t (discount gamma); A = masked_whiten(G) over *all* response
    tokens of the batch (global normalization, no per-group baseline). `kl[B, T]` is the
    per-token KL estimate (see kl.kl_estimate), detached by the caller. -> [B, T]."""
    token_r = outcome_token_rewards(rewards.to(_out_dtype(rewards)), response_mask)
    if kl is not None and kl_coef != 0.0:
        if kl.shape != response_mask.shape:
            raise ValueError(
                f"kl must be [B, T] = {tuple(response_mask.shape)}, got {tuple(kl.shape)}"
            )
        token_r = token_r - kl_coef * kl.to(token_r.dtype)
    returns = discounted_returns(token_r, response_mask, gamma)
    return masked_whiten(returns, response_mask)


def on_policy_distillation_advantages(
    teacher_logprobs: Tensor, student_logprobs: Tensor, response_mask: Tensor
) -> Tensor:
    """On-policy distillation: A_t = log pi_teacher(y_t) - log pi_student(y_t) on the sampled
    tokens (a per-token negative reverse-KL sample). Zero outside the mask. [B, T] -> [B, T]."""
    if (
        teacher_logprobs.shape != student_logprobs.shape
        or teacher_logprobs.shape != response_mask.shape
    ):
        raise ValueError(
            "teacher_logprobs, student_logprobs and response_mask must share [B, T]; got "
            f"{tuple(teacher_logprobs.shape)}, {tuple(student_logprobs.shape)}, {tuple(response_mask.shape)}"
        )
    diff = teacher_logprobs - student_logprobs
    return torch.where(response_mask.bool(), diff, torch.zeros_like(diff))


def broadcast_to_tokens(seq_adv: Tensor, response_mask: Tensor) -> Tensor:
    """Sequence advantage [B] -> the same value on every response token [B, T]."""
    return seq_adv[:, None] * response_mask.to(seq_adv.dtype)


def _need(inp: AdvantageInputs, field: str, estimator: str) -> Tensor:
    value = getattr(inp, field)
    if value is None:
        raise ValueError(f"advantage estimator {estimator!r} needs AdvantageInputs.{field}")
    return value


def _grpo(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    return broadcast_to_tokens(
        grpo_advantages(inp.rewards, inp.group_ids, cfg.norm_by_std, cfg.eps), inp.response_mask
    )


def _dr_grpo(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    return broadcast_to_tokens(dr_grpo_advantages(inp.rewards, inp.group_ids), inp.response_mask)


def _rloo(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    return broadcast_to_tokens(rloo_advantages(inp.rewards, inp.group_ids), inp.response_mask)


def _reinforce_pp(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    kl = None
    if cfg.kl_coef != 0.0:
        old = _need(inp, "old_logprobs", "reinforce_plus_plus")
        ref = _need(inp, "ref_logprobs", "reinforce_plus_plus")
        kl = kl_estimate(old.detach(), ref.detach(), cfg.kl_estimator)
    return reinforce_plus_plus_advantages(
        inp.rewards, inp.response_mask, kl, cfg.kl_coef, cfg.gamma
    )


def _opd(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    teacher = _need(inp, "teacher_logprobs", "on_policy_distillation")
    student = _need(inp, "old_logprobs", "on_policy_distillation")
    return on_policy_distillation_advantages(teacher, student, inp.response_mask)


# GSPO uses GRPO's group-normalized advantages; what changes is the sequence-level ratio in
# the loss (losses.py, policy_loss="gspo").
ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs, AdvantageConfig], Tensor]] = {
    "grpo": _grpo,
    "dr_grpo": _dr_grpo,
    "gspo": _grpo,
    "rloo": _rloo,
    "reinforce_plus_plus": _reinforce_pp,
    "on_policy_distillation": _opd,
}


def compute_advantages(
    name: str, inputs: AdvantageInputs, config: AdvantageConfig | None = None
) -> Tensor:
    """Look up `name` in ADVANTAGE_ESTIMATORS and run it -> advantages [B, T] (float32)."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    if inputs.response_mask.dim() != 2 or inputs.response_mask.shape[0] != inputs.rewards.shape[0]:
        raise ValueError(
            f"response_mask must be [B, T] with B = len(rewards) = {inputs.rewards.shape[0]}, "
            f"got {tuple(inputs.response_mask.shape)}"
        )
    return ADVANTAGE_ESTIMATORS[name](inputs, config or AdvantageConfig()).float()
