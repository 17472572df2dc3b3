"""Train-vs-rollout log-prob mismatch: sample with the engine, re-score on the trainer path.

The RL loss assumes the log-probs the sampler reports are the trainer's. This module measures
how far apart they are for a given model, precision, adapter and mode:

1. `engine.generate` samples completions and returns each sampled token's log-prob under
   `log_softmax(logits / T)` (`logprobs_mode="scaled"`, the trainer's definition), computed in
   prefill + decode steps over the KV cache;
2. `score_packed` re-scores prompt + completion exactly like `PolicyWorker.compute_logprobs`:
   one packed forward (`AttnBatch.packed`), `orbit.models.logprobs.response_logprobs`;
3. `mismatch_metrics` compares the two per token.

Metrics (lp_t = trainer, lp_r = rollout log-prob of the sampled token, r = lp_t - lp_r):
mean/max |r|, the fraction of tokens with r != 0 (bitwise), and KL(rollout || trainer)
estimated on the rollout's own samples with k1 = mean(-r) and k3 = mean(exp(r) - 1 - r)
(Schulman's unbiased, always-non-negative estimator).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from orbit.data.sample import Sample, pack_samples
from orbit.models.attention import AttnBatch
from orbit.models.logprobs import response_logprobs
from orbit.rollout.types import SamplingParams


@dataclass(frozen=True)
class MismatchMetrics:
    """Per-token train-vs-rollout log-prob gap over `n_tokens` sampled tokens."""

    n_tokens: int
    mean_abs: float  # mean |lp_train - lp_rollout|
    max_abs: float  # max |lp_train - lp_rollout|
    frac_diff: float  # fraction of tokens whose two log-probs are not bitwise equal
    kl_k1: float  # mean(lp_rollout - lp_train): KL(rollout || train), k1 estimator
    kl_k3: float  # mean(exp(r) - 1 - r), r = lp_train - lp_rollout: k3 estimator

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def exceeds(self, bound: float) -> bool:
        """True if the max per-token gap is over `bound` (exact mode uses bound 0)."""
        return self.max_abs > bound or math.isnan(self.max_abs)


def mismatch_metrics(lp_train: Sequence[float] | Tensor, lp_rollout: Sequence[float] | Tensor) -> MismatchMetrics:
    """Compare flat per-token log-probs (same order, same length); float64 statistics."""
    t = torch.as_tensor(lp_train, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(lp_rollout, dtype=torch.float64).reshape(-1)
    if t.shape != r.shape:
        raise ValueError(f"lp_train has {t.numel()} tokens but lp_rollout has {r.numel()}")
    if t.numel() == 0:
        raise ValueError("mismatch_metrics: no tokens to compare")
    d = t - r  # log(pi_train / pi_rollout) per sampled token
    return MismatchMetrics(
        n_tokens=int(t.numel()),
        mean_abs=float(d.abs().mean()),
        max_abs=float(d.abs().max()),
        frac_diff=float((t != r).double().mean()),
        kl_k1=float((-d).mean()),
        kl_k3=float((torch.expm1(d) - d).mean()),
    )


@torch.no_grad()
def score_packed(model: nn.Module, samples: list[Sample], temperature: float = 1.0,
                 max_tokens: int = 16384, chunk: int = 1024) -> list[list[float]]:
    """Trainer-path log-probs of each sample's response tokens: packed forwards of at most
    `max_tokens` tokens, as PolicyWorker.compute_logprobs does them."""
    from orbit.trainer.batching import micro_batches, to_device

    device = model.model.embed_tokens.weight.device
    out: list[list[float]] = [[] for _ in samples]
    for idx in micro_batches(samples, max_tokens):
        batch = to_device(pack_samples([samples[i] for i in idx]), device)
        h = model(batch.input_ids, batch.positions, AttnBatch.packed(batch.cu_seqlens))  # [N, D]
        lp = response_logprobs(model, h, batch, temperature, chunk=chunk).cpu()
        for row, i in enumerate(idx):
            out[i] = lp[row, : len(samples[i].response_ids)].tolist()
    return out


def rollout_samples(engine: Any, prompts: list[list[int]], sampling: SamplingParams,
                    n: int = 1) -> list[Sample]:
    """Sample `n` completions per prompt with the engine; rollout log-probs in the trainer's
    definition (`logprobs_mode="scaled"`). Empty completions are dropped."""
    if sampling.temperature <= 0:
        raise ValueError("measuring log-prob mismatch needs temperature > 0 (greedy has no log-probs)")
    sampling = dataclasses.replace(sampling, logprobs_mode="scaled")
    groups = engine.generate(prompts, sampling, n)
    samples = []
    for gi, (p, comps) in enumerate(zip(prompts, groups)):
        for j, c in enumerate(comps):
            if c.tokens:
                samples.append(Sample(prompt_ids=list(p), response_ids=list(c.tokens),
                                      rollout_logprobs=list(c.logprobs), group_id=gi, index=j))
    if not samples:
        raise ValueError("the engine returned only empty completions; nothing to compare")
    return samples


@dataclass
class AlignmentResult:
    metrics: MismatchMetrics
    samples: list[Sample]
    train_logprobs: list[list[float]]


def measure_mismatch(rollout_model: nn.Module, engine: Any, prompts: list[list[int]],
                     sampling: SamplingParams, n: int = 1, train_model: nn.Module | None = None,
                     max_tokens: int = 16384) -> AlignmentResult:
    """Sample with `engine` (which runs `rollout_model`), score on the trainer path with
    `train_model` (default: the same model, Orbit's design; a separate BF16 model gives the
    conventional-setup baseline), and compare."""
    samples = rollout_samples(engine, prompts, sampling, n)
    scorer = rollout_model if train_model is None else train_model
    lp_train = score_packed(scorer, samples, sampling.temperature, max_tokens)
    flat_t = [x for row in lp_train for x in row]
    flat_r = [x for s in samples for x in s.rollout_logprobs]
    return AlignmentResult(mismatch_metrics(flat_t, flat_r), samples, lp_train)


def random_prompts(num: int, vocab_size: int, min_len: int = 4, max_len: int = 32,
                   seed: int = 0) -> list[list[int]]:
    """Random token-id prompts (for random-weight models and smoke checks)."""
    if num < 1 or not (1 <= min_len <= max_len):
        raise ValueError(f"random_prompts: need num >= 1 and 1 <= min_len <= max_len, got {num}, {min_len}, {max_len}")
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lens]
