"""The `Sample` record that flows prompt -> rollout -> reward -> advantage -> loss, and the
helpers that turn a list of samples into the tensors the algorithms and the model read.

Two layouts meet here. The model runs on a *packed* batch (all sequences concatenated, no
padding, `cu_seqlens` boundaries); the loss functions read right-padded `[B, T]` response
tensors. `pack_samples` builds the former and `PackedBatch.to_padded` maps per-position
values (e.g. token log-probs) back to the latter, so the trainer never hand-computes offsets.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Sample:
    """One response to one prompt. `group_id` is shared by the n responses to a prompt;
    `index` is the sample's position in its group."""

    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)  # one per response token
    reward: float = 0.0
    rewards_by_fn: dict[str, float] = field(default_factory=dict)
    group_id: int = 0
    index: int = 0
    label: Any = None
    finish_reason: str = ""  # "stop" / "length" / "abort", as the engine reports it
    prompt_text: str = ""
    response_text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rollout_logprobs and len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"Sample(group {self.group_id}, index {self.index}): rollout_logprobs has "
                f"{len(self.rollout_logprobs)} entries for {len(self.response_ids)} response_ids"
            )


def group_samples(samples: list[Sample]) -> dict[int, list[Sample]]:
    """group_id -> its samples, in first-seen order."""
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group_id].append(s)
    return dict(groups)


def pad_2d(
    rows: list[list[float]] | list[list[int]], pad: float = 0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Right-pad ragged rows to [B, max_len] (max_len 0 gives [B, 0])."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


@dataclass(frozen=True)
class RolloutBatch:
    """Per-sample tensors for advantages and losses (CPU; move them where the loss runs)."""

    rewards: Tensor  # [B] float32
    group_ids: Tensor  # [B] int64
    response_mask: Tensor  # [B, T] bool, T = longest response
    rollout_logprobs: Tensor  # [B, T] float32, 0 on padding
    response_lengths: Tensor  # [B] int64


def collate(samples: list[Sample]) -> RolloutBatch:
    if not samples:
        raise ValueError("collate: empty list of samples")
    for s in samples:
        if s.response_ids and not s.rollout_logprobs:
            raise ValueError(f"Sample(group {s.group_id}, index {s.index}) has no rollout_logprobs")
    lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.int64)
    width = int(lengths.max().item())
    mask = torch.arange(width)[None, :] < lengths[:, None]  # [B, T]
    return RolloutBatch(
        rewards=torch.tensor([float(s.reward) for s in samples], dtype=torch.float32),
        group_ids=torch.tensor([s.group_id for s in samples], dtype=torch.int64),
        response_mask=mask,
        rollout_logprobs=pad_2d([s.rollout_logprobs for s in samples]),
        response_lengths=lengths,
    )


@dataclass(frozen=True)
class PackedBatch:
    """prompt+response of every sample concatenated into one row of N tokens.

    `targets[k]` is the token that position k predicts (the next token of the same
    sequence; 0 at each sequence's last position, where nothing is predicted). The log-prob
    of response token j of sample i is read at position `response_index[i, j]`."""

    input_ids: Tensor  # [N] int64
    positions: Tensor  # [N] int64, restarting at 0 per sequence
    cu_seqlens: Tensor  # [B + 1] int32, sequence boundaries
    targets: Tensor  # [N] int64
    response_index: Tensor  # [B, T] int64 into [0, N); 0 on padding
    response_mask: Tensor  # [B, T] bool

    def response_rows(self) -> Tensor:
        """[R] packed positions whose next token is a response token, in [B, T] row-major
        order of the valid entries: the only rows whose logits a loss or a score needs."""
        return self.response_index[self.response_mask]

    def scatter_responses(self, per_response: Tensor) -> Tensor:
        """[R, ...] values at `response_rows()` -> [B, T, ...] response layout, 0 on padding."""
        mask = self.response_mask.to(per_response.device)
        out = per_response.new_zeros(*mask.shape, *per_response.shape[1:])
        out[mask] = per_response
        return out

    def to_padded(self, per_position: Tensor) -> Tensor:
        """[N, ...] values at packed positions -> [B, T, ...] response layout, 0 on padding."""
        if per_position.shape[0] != self.input_ids.shape[0]:
            raise ValueError(
                f"per_position has {per_position.shape[0]} rows, packed batch has {self.input_ids.shape[0]}"
            )
        out = per_position[self.response_index.to(per_position.device)]  # [B, T, ...]
        mask = self.response_mask.to(per_position.device)
        return out * mask.view(*mask.shape, *([1] * (out.dim() - 2))).to(out.dtype)


def pack_samples(samples: list[Sample]) -> PackedBatch:
    """Concatenate prompt_ids + response_ids of each sample (response must be non-empty)."""
    if not samples:
        raise ValueError("pack_samples: empty list of samples")
    ids: list[int] = []
    pos: list[int] = []
    tgt: list[int] = []
    bounds = [0]
    resp_rows: list[list[int]] = []
    for s in samples:
        if not s.prompt_ids or not s.response_ids:
            raise ValueError(
                f"Sample(group {s.group_id}, index {s.index}) needs non-empty prompt_ids and response_ids"
            )
        seq = list(s.prompt_ids) + list(s.response_ids)
        start = len(ids)
        ids.extend(seq)
        pos.extend(range(len(seq)))
        tgt.extend(seq[1:] + [0])
        bounds.append(len(ids))
        # Response token j sits at start + P + j and is predicted from the position before it.
        p = len(s.prompt_ids)
        resp_rows.append([start + p + j - 1 for j in range(len(s.response_ids))])
    lengths = torch.tensor([len(r) for r in resp_rows])
    width = int(lengths.max().item())
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        positions=torch.tensor(pos, dtype=torch.int64),
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        targets=torch.tensor(tgt, dtype=torch.int64),
        response_index=pad_2d(resp_rows, 0, torch.int64),
        response_mask=torch.arange(width)[None, :] < lengths[:, None],
    )
