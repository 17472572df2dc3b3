"""The driver's small helpers: advantages over the gathered batch, rollout metrics, mini-batches.

Advantages are computed on the driver, over the whole rollout batch gathered from every worker,
because some estimators (REINFORCE++) normalise over the batch rather than per group; the
grouped ones give the same answer either way. Everything here is torch-on-CPU and cheap.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Any

import torch

from orbit.algorithms.advantages import AdvantageConfig, AdvantageInputs, compute_advantages
from orbit.config import AlgoConfig

log = logging.getLogger("orbit.trainer")


def response_mask(samples: list[Any]) -> torch.Tensor:
    """[B, R] bool over each sample's response tokens (R = longest response, at least 1)."""
    r = max([len(s.response_ids) for s in samples] + [1])
    m = torch.zeros(len(samples), r, dtype=torch.bool)
    for b, s in enumerate(samples):
        m[b, : len(s.response_ids)] = True
    return m


def assign_advantages(samples: list[Any], algo: AlgoConfig) -> None:
    """Set `s.metadata["advantages"]` (one float per response token) on every sample."""
    if not samples:
        return
    mask = response_mask(samples)
    inputs = AdvantageInputs(
        rewards=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),
        group_ids=torch.tensor([int(s.group_id) for s in samples], dtype=torch.long),
        response_mask=mask,
    )
    name = "grpo" if algo.advantage_estimator == "gspo" else algo.advantage_estimator
    adv = compute_advantages(name, inputs, AdvantageConfig())  # [B, R]
    for b, s in enumerate(samples):
        s.metadata["advantages"] = adv[b, : len(s.response_ids)].tolist()


def drop_failed_samples(samples: list[Any], first_group: int = 0) -> list[Any]:
    """`samples` less those the engine refused (finish_reason "error": an empty prompt, one
    longer than the context, ...). Each prompt that lost samples is logged as a warning with
    its index in the step's batch (group_id - first_group) and the engine's message.

    A failed sample leaves its GRPO group (the baseline is taken over the samples that ran);
    a group with none left is skipped. Raises ValueError when nothing ran: no step can be
    taken, and every prompt failing means the data or the lengths are misconfigured."""
    sizes = Counter(int(s.group_id) for s in samples)
    failed: dict[int, list[Any]] = {}
    kept = []
    for s in samples:
        if s.finish_reason == "error":
            failed.setdefault(int(s.group_id), []).append(s)
        else:
            kept.append(s)
    msgs = []
    for gid, bad in failed.items():
        err = bad[0].metadata.get("rollout_error", "no message")
        msgs.append(f"prompt {gid - first_group}: {err}")
        what = "group skipped" if len(bad) == sizes[gid] else f"the other {sizes[gid] - len(bad)} kept"
        log.warning("prompt %d (group %d): %d of %d samples failed in the rollout engine and are "
                    "dropped from its GRPO group (%s): %s", gid - first_group, gid, len(bad),
                    sizes[gid], what, err)
    if samples and not kept:
        shown = "; ".join(msgs[:3]) + ("; ..." if len(msgs) > 3 else "")
        raise ValueError(f"every prompt of the step ({len(failed)}) failed in the rollout engine, "
                         f"nothing to train on: {shown} (check --max-prompt-len and the prompt data)")
    return kept


def mini_batches(samples: list[Any], size: int, partial: bool = False) -> list[list[Any]]:
    """Consecutive optimizer-step batches of `size` samples (groups stay together in order).

    partial: the rollout lost samples (`drop_failed_samples`), so the count need not divide
    by `size`: whole groups are dealt, in order, into ceil(len / size) batches of about equal
    length. Without it a count that does not divide is a bug and raises."""
    if partial and len(samples) % size:
        return _split_groups(samples, -(-len(samples) // size))
    if len(samples) % size:
        raise ValueError(f"{len(samples)} samples do not split into global batches of {size}")
    return [samples[i: i + size] for i in range(0, len(samples), size)]


def _split_groups(samples: list[Any], num: int) -> list[list[Any]]:
    """Consecutive runs of whole groups (samples are in group order) into at most `num`
    non-empty batches, each closing once it reaches its share of the samples."""
    groups: list[list[Any]] = []
    for s in samples:
        if groups and groups[-1][0].group_id == s.group_id:
            groups[-1].append(s)
        else:
            groups.append([s])
    out: list[list[Any]] = [[]]
    for g in groups:
        if out[-1] and len(out) < num and sum(map(len, out)) >= len(out) * len(samples) / num:
            out.append([])
        out[-1].extend(g)
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return 0.0, 0.0
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def rollout_metrics(samples: list[Any]) -> dict[str, float]:
    """slime/verl-style rollout/* metrics of one rollout batch."""
    rewards = [float(s.reward) for s in samples]
    lens = [len(s.response_ids) for s in samples]
    mean, std = _mean_std(rewards)
    groups: dict[int, list[float]] = {}
    for s in samples:
        groups.setdefault(int(s.group_id), []).append(float(s.reward))
    zero_std = sum(1 for g in groups.values() if max(g) == min(g))
    out = {
        "rollout/reward_mean": mean,
        "rollout/reward_std": std,
        "rollout/response_len_mean": sum(lens) / max(len(lens), 1),
        "rollout/response_len_max": float(max(lens, default=0)),
        "rollout/truncated_ratio": sum(s.finish_reason == "length" for s in samples) / max(len(samples), 1),
        "rollout/zero_std_group_frac": zero_std / max(len(groups), 1),
        "rollout/num_samples": float(len(samples)),
    }
    # per reward function, when the reward runner reports components
    parts: dict[str, list[float]] = {}
    for s in samples:
        for k, v in s.rewards_by_fn.items():
            parts.setdefault(k, []).append(float(v))
    for k, vs in parts.items():
        out[f"rollout/reward_{k}_mean"] = sum(vs) / len(vs)
    for s in samples:  # reward calls that raised / timed out / returned a non-number
        for fn in s.metadata.get("reward_failures", []):
            out[f"reward/failures/{fn}"] = out.get(f"reward/failures/{fn}", 0.0) + 1.0
    return out


def reduce_train_metrics(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Average the metrics of the optimizer steps of one rollout (maxes stay maxes, times add)."""
    out: dict[str, float] = {}
    for k in per_step[0]:
        vals = [m[k] for m in per_step if k in m]
        if k.endswith("_max"):
            out[k] = max(vals)
        elif k.startswith("perf/"):
            out[k] = sum(vals) if "time" in k or "tokens" in k else max(vals)
        else:
            out[k] = sum(vals) / len(vals)
    return out
