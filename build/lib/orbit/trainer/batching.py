"""Splitting a worker's samples into packed micro-batches that fit a token budget.

Packing itself (`orbit.data.sample.pack_samples`) lives with the Sample type; this file only
decides which samples share a micro-batch and moves a packed batch to the worker's device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from orbit.data.sample import PackedBatch, pad_2d


def seq_len(s: Any) -> int:
    return len(s.prompt_ids) + len(s.response_ids)


def micro_batches(samples: Sequence[Any], max_tokens: int) -> list[list[int]]:
    """Indices of `samples` in consecutive groups whose packed length fits `max_tokens`
    (a single longer sample gets its own micro-batch). Order is kept so runs are reproducible."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, s in enumerate(samples):
        n = seq_len(s)
        if cur and used + n > max_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        out.append(cur)
    return out


def to_device(batch: PackedBatch, device: torch.device) -> PackedBatch:
    return PackedBatch(**{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)})


def padded(rows: Sequence[Sequence[float]], batch: PackedBatch) -> torch.Tensor:
    """Per-response python lists -> [B, T] float32 matching `batch.response_mask` (0 on padding)."""
    out = pad_2d([list(r) for r in rows], 0.0, torch.float32)  # [B, T_rows]
    t = batch.response_mask.shape[1]
    if out.shape[1] != t:
        raise ValueError(f"per-response values are {out.shape[1]} wide, responses are {t} long")
    return out.to(batch.response_mask.device)
