"""Compute every reward term for a batch of samples, in parallel, without ever crashing.

A reward function is user code run on model output: it can raise, hang, or return NaN. One
such sample must not kill a multi-hour run, and must not be hidden either. The runner gives
that call reward 0, records a `RewardFailure` (function, sample, kind, message), logs it and
counts it per function, so the trainer can put `reward/failures/<fn>` in its metrics.

Concurrency: one asyncio loop per `run`; sync functions go to a thread pool, async ones run
on the loop; every call gets `timeout_s`. An async call that times out is cancelled. A sync
call cannot be interrupted in Python, so after its timeout it keeps one pool thread busy until
it returns: size `max_workers` for that, or make slow functions async.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

from orbit.data.sample import Sample
from orbit.rewards.custom import RewardSpec

log = logging.getLogger("orbit.rewards")
_FAILED = object()  # a user function may legitimately return None (then it is a bad value)


@dataclass(frozen=True)
class RewardFailure:
    fn: str
    sample_index: int | None  # position in the batch; None when a whole batch call failed
    kind: str  # "exception" | "timeout" | "non_finite" | "bad_value"
    message: str


@dataclass
class RewardResult:
    total: list[float]  # [B] weighted sum over the terms that ran
    by_fn: dict[str, list[float]]  # term name -> [B] unweighted values
    failures: list[RewardFailure]


class _BadValue(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _to_float(value: Any) -> float:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise _BadValue(
            "bad_value", f"returned {type(value).__name__} {value!r:.80}, expected a float"
        )
    out = float(value)
    if not math.isfinite(out):
        raise _BadValue("non_finite", f"returned {out}")
    return out


class RewardRunner:
    def __init__(
        self, specs: list[RewardSpec], timeout_s: float = 30.0, max_workers: int = 8
    ) -> None:
        if not specs:
            raise ValueError("RewardRunner needs at least one reward function")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"reward function names must be unique, got {names}")
        for s in specs:
            if not math.isfinite(s.weight):
                raise ValueError(f"reward {s.name!r}: weight must be finite, got {s.weight}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.specs = list(specs)
        self.timeout_s = timeout_s
        self.failure_counts: Counter[str] = Counter()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="orbit-reward")

    def close(self) -> None:
        # wait=False: a hung user function must not hang shutdown too.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def active_specs(self, eval_mode: bool) -> list[RewardSpec]:
        """Eval mode drops train_only terms (the format bonus): eval reports correctness only."""
        return [s for s in self.specs if not (eval_mode and s.train_only)]

    def run(self, samples: list[Sample], eval_mode: bool = False) -> RewardResult:
        """Blocking form; from inside a running event loop use `await arun(...)`."""
        return asyncio.run(self.arun(samples, eval_mode))

    def apply(self, samples: list[Sample], eval_mode: bool = False) -> RewardResult:
        """run(), then write `reward` and `rewards_by_fn` into each sample."""
        result = self.run(samples, eval_mode)
        for i, s in enumerate(samples):
            s.reward = result.total[i]
            s.rewards_by_fn = {name: vals[i] for name, vals in result.by_fn.items()}
        return result

    async def arun(self, samples: list[Sample], eval_mode: bool = False) -> RewardResult:
        specs = self.active_specs(eval_mode)
        failures: list[RewardFailure] = []
        per_spec = await asyncio.gather(*(self._run_spec(s, samples, failures) for s in specs))
        by_fn = {s.name: vals for s, vals in zip(specs, per_spec)}
        total = [sum(s.weight * by_fn[s.name][i] for s in specs) for i in range(len(samples))]
        for f in failures:
            self.failure_counts[f.fn] += 1
        return RewardResult(total=total, by_fn=by_fn, failures=failures)

    async def _call(self, spec: RewardSpec, arg: Any) -> Any:
        if spec.is_async:
            coro: Awaitable[Any] = spec.fn(arg)
        else:
            fn: Callable[..., Any] = spec.fn
            coro = asyncio.get_running_loop().run_in_executor(self._pool, fn, arg)
        return await asyncio.wait_for(coro, timeout=self.timeout_s)

    async def _guarded(
        self, spec: RewardSpec, arg: Any, index: int | None, failures: list[RewardFailure]
    ) -> Any:
        """The call's raw value, or _FAILED after recording why it failed."""
        try:
            return await self._call(spec, arg)
        except TimeoutError:
            self._fail(failures, spec, index, "timeout", f"timed out after {self.timeout_s}s")
        except Exception as e:  # noqa: BLE001 - user code: an error becomes a recorded failure
            self._fail(failures, spec, index, "exception", f"{type(e).__name__}: {e}")
        return _FAILED

    async def _run_spec(
        self, spec: RewardSpec, samples: list[Sample], failures: list[RewardFailure]
    ) -> list[float]:
        if spec.is_batch:
            raw = await self._guarded(spec, samples, None, failures)
            if raw is _FAILED:
                return [0.0] * len(samples)
            if not isinstance(raw, (list, tuple)) or len(raw) != len(samples):
                got = (
                    f"{type(raw).__name__} of length {len(raw)}"
                    if hasattr(raw, "__len__")
                    else repr(raw)
                )
                self._fail(
                    failures,
                    spec,
                    None,
                    "bad_value",
                    f"batch call returned {got}, expected {len(samples)}",
                )
                return [0.0] * len(samples)
            return [self._value(failures, spec, i, v) for i, v in enumerate(raw)]
        raws = await asyncio.gather(
            *(self._guarded(spec, s, i, failures) for i, s in enumerate(samples))
        )
        return [
            0.0 if r is _FAILED else self._value(failures, spec, i, r) for i, r in enumerate(raws)
        ]

    def _value(
        self, failures: list[RewardFailure], spec: RewardSpec, index: int, raw: Any
    ) -> float:
        try:
            return _to_float(raw)
        except _BadValue as e:
            self._fail(failures, spec, index, e.kind, str(e))
            return 0.0

    @staticmethod
    def _fail(
        failures: list[RewardFailure], spec: RewardSpec, index: int | None, kind: str, message: str
    ) -> None:
        where = "the batch" if index is None else f"sample {index}"
        log.warning("reward %r failed on %s (%s): %s", spec.name, where, kind, message)
        failures.append(RewardFailure(fn=spec.name, sample_index=index, kind=kind, message=message))
