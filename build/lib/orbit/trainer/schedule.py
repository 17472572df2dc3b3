"""Learning-rate schedule: linear warmup, then constant, cosine or linear decay to min_lr.

A LambdaLR over a pure function of the optimizer step, so its state is just the step count and
resumes exactly from a checkpoint.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup: int, total: int, style: str, min_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based, the step about to run)."""
    if style not in ("constant", "cosine", "linear"):
        raise ValueError(f"--lr-decay-style must be constant, cosine or linear, got {style!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if style == "constant" or total <= warmup:
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if style == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, warmup: int, total: int,
                    style: str, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup=warmup, total=total, style=style, min_ratio=min_ratio),
    )
