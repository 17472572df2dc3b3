"""Watch the per-step train-vs-rollout mismatch during training and warn on a sudden jump.

A slowly drifting gap is expected in fast mode (adapter weights grow, distributions sharpen);
a step where the gap jumps by an order of magnitude usually means something broke: a stale
adapter slot served the rollout, a kernel fell back to another path, NaNs in the KV cache.
`MismatchMonitor.update(step, metrics)` keeps a window of recent values per metric and warns
(via `logging` and in its return value) when a value exceeds `factor` x the running median
*and* an absolute floor, so noise around zero (exact mode: 0, 0, 0, ...) never triggers it.
Exact mode is stricter: any nonzero value of a watched metric is reported.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_FLOORS = {"mean_abs": 1e-3, "max_abs": 5e-2, "kl_k3": 1e-5}


@dataclass
class MismatchJump:
    """One warning: `metric` at `step` was `value`, `ratio` times the running `median`."""

    step: int
    metric: str
    value: float
    median: float
    ratio: float

    def message(self) -> str:
        return (f"train/rollout log-prob mismatch jumped at step {self.step}: {self.metric}="
                f"{self.value:.3g} is {self.ratio:.1f}x the running median {self.median:.3g}")


@dataclass
class MismatchMonitor:
    """Call `update(step, metrics)` once per step with the step's mismatch metrics (a dict with
    any of `mean_abs`, `max_abs`, `kl_k3`, ... as produced by `mismatch_metrics(...).as_dict()`).

    factor: a value above factor x running median is a jump. floors: per-metric absolute
    floor under which nothing is a jump. window: how many past steps the median covers.
    min_history: steps seen before jumps are judged (the median needs some history).
    exact: any nonzero watched value is reported (exact mode promises 0).
    """

    factor: float = 5.0
    floors: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FLOORS))
    window: int = 50
    min_history: int = 3
    exact: bool = False
    _history: dict[str, deque] = field(default_factory=dict, repr=False)
    jumps: list[MismatchJump] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.factor <= 1.0:
            raise ValueError(f"MismatchMonitor.factor must be > 1, got {self.factor}")
        if self.window < 1 or self.min_history < 1:
            raise ValueError(f"MismatchMonitor window/min_history must be >= 1, got {self.window}/{self.min_history}")

    def update(self, step: int, metrics: Mapping[str, Any]) -> list[MismatchJump]:
        """Record this step's values; returns (and logs) the jumps found at this step."""
        found: list[MismatchJump] = []
        for name, floor in self.floors.items():
            if name not in metrics:
                continue
            value = float(metrics[name])
            hist = self._history.setdefault(name, deque(maxlen=self.window))
            if math.isnan(value) or math.isinf(value):
                found.append(MismatchJump(step, name, value, math.nan, math.inf))
                continue  # a NaN would poison the median
            if self.exact and value != 0.0:
                found.append(MismatchJump(step, name, value, 0.0, math.inf))
            elif len(hist) >= self.min_history and value > floor:
                med = statistics.median(hist)
                if value > self.factor * med:
                    found.append(MismatchJump(step, name, value, med,
                                              value / med if med > 0 else math.inf))
            hist.append(value)
        for j in found:
            log.warning(j.message())
        self.jumps.extend(found)
        return found

    def median(self, metric: str) -> float | None:
        hist = self._history.get(metric)
        return statistics.median(hist) if hist else None
