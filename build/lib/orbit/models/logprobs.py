"""Per-token log-probabilities, one definition for the sampler and the trainer.

The engine scores the token it sampled with `logprobs_from_logits` on the logits it sampled
from; the trainer calls `token_logprobs`, which runs the same function over chunks of the
packed hidden states. Sharing the function (temperature applied the same way, float32
log-softmax) is what keeps rollout and training log-probs equal up to the matmul itself.

`token_logprobs` never holds the [T, V] logits of the whole batch: it walks `chunk` rows at
a time, and under autograd it recomputes each chunk's logits in backward (checkpointing)
instead of keeping them, so peak extra memory is one [chunk, V] float32 block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def logprobs_from_logits(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """logits [N, V] (any float dtype), targets [N] -> (log p(target) [N] float32, entropy [N] or None).

    Temperature divides the logits before the softmax, exactly as sampling does.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for log-probs, got {temperature}")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    logp = F.log_softmax(z, dim=-1)  # [N, V]
    lp = logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return lp, ent


def _chunk_fn(model: Any, temperature: float, with_entropy: bool):
    def fn(h: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        lp, ent = logprobs_from_logits(model.logits(h), t, temperature, with_entropy)
        return lp, (ent if ent is not None else lp.new_zeros(0))

    return fn


def token_logprobs(
    model: Any,
    hidden: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    chunk: int = 1024,
    with_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """hidden [T, D] (CausalLM output), targets [T] -> log p [T] float32 (and entropy [T]).

    `model` is anything with `.logits(hidden) -> [N, V]` (a `CausalLM`). `targets[i]` is the
    token *following* position i; the caller shifts.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"token_logprobs needs hidden [T, D] and targets [T]; got {tuple(hidden.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    fn = _chunk_fn(model, temperature, with_entropy)
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    lps, ents = [], []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        lp, ent = checkpoint(fn, h, t, use_reentrant=False) if use_ckpt else fn(h, t)
        lps.append(lp)
        ents.append(ent)
    lp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=torch.float32)
    if with_entropy:
        return lp, (torch.cat(ents) if ents else lp.new_zeros(0))
    return lp


def response_logprobs(
    model: Any,
    hidden: Tensor,
    batch: Any,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int = 1024,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs (and entropy) of each response token of a packed batch, [B, T] float32.

    `batch` is an `orbit.data.sample.PackedBatch` and `hidden` its [N, D] CausalLM output. Only
    the rows that predict a response token go through lm_head and the log-softmax: prompt rows
    would be masked out anyway, and on a short-answer task they are most of the batch
    (lm_head is ~20% of SmolLM2's matmul work, and its logits are recomputed in backward).
    """
    rows = batch.response_rows().to(hidden.device)  # [R]
    out = token_logprobs(model, hidden[rows], batch.targets.to(hidden.device)[rows], temperature,
                         chunk=chunk, with_entropy=with_entropy)
    if with_entropy:
        lp, ent = out
        return batch.scatter_responses(lp), batch.scatter_responses(ent)
    return batch.scatter_responses(out)

