"""Compute every reward term for a batch of samples, in parallel, without ever crashing.

A reward function is user code run on model output: it can raise, hang, or return NaN. One
such sample must not kill a multi-hour run, and must not be hidden either. The runner gives
that call reward 0, records a `RewardFailure` (function, sample, kind, message), logs it and
counts it per function, so the trainer can put `reward/failures/<fn>` in its metrics.

Concurrency: one asyncio loop per `run`; at most `max_workers` calls are in flight. Sync
functions run on a small pool of daemon threads, async ones on the loop. `timeout_s` counts
from the moment a call starts (waiting for a free slot is not charged to it). A timed-out
async call is cancelled; a sync call cannot be interrupted in Python, so its thread is left
to finish on its own (a daemon: it never blocks process exit) and a fresh thread takes its
place in the pool. Pure-Python verifiers share the GIL, so threads buy overlap for I/O-bound
rewards (remote verifiers, sandboxes), not CPU parallelism.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections import Counter
from collections.abc import Callable
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


def _resolve(fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller timed out and moved on
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class _Job:
    __slots__ = ("abandoned", "arg", "done", "finished", "fn")

    def __init__(self, fn: Callable[..., Any], arg: Any, done: Callable[[Any, Any], None]) -> None:
        self.fn, self.arg, self.done = fn, arg, done
        self.finished = self.abandoned = False


class _DaemonPool:
    """`size` daemon threads fed from a queue. A call that times out leaves its thread stuck,
    so the pool starts a replacement and the stuck thread exits once its call returns: the
    threads free to take work stay `size`, and no thread ever blocks interpreter exit (a
    ThreadPoolExecutor joins its threads at exit, so one hung call would hang the process)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0
        self._started = False

    def _spawn(self) -> None:
        self._live += 1
        threading.Thread(target=self._work, name="orbit-reward", daemon=True).start()

    def submit(self, fn: Callable[..., Any], arg: Any, done: Callable[[Any, Any], None]) -> _Job:
        with self._lock:
            if not self._started:
                self._started = True
                for _ in range(self._size):
                    self._spawn()
        job = _Job(fn, arg, done)
        self._jobs.put(job)
        return job

    def abandon(self, job: _Job) -> None:
        with self._lock:
            if not job.finished:
                job.abandoned = True
                self._spawn()

    def shutdown(self) -> None:
        with self._lock:
            for _ in range(self._live):
                self._jobs.put(None)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            value, error = None, None
            try:
                value = job.fn(job.arg)
            except Exception as e:  # noqa: BLE001 - handed to the awaiting call, which records it
                error = e
            job.done(value, error)
            with self._lock:
                job.finished = True
                if job.abandoned:  # a replacement already took this thread's place
                    self._live -= 1
                    return


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
        if max_workers <= 0:
            raise ValueError(f"max_workers must be > 0, got {max_workers}")
        self.specs = list(specs)
        self.timeout_s = timeout_s
        self.max_workers = max_workers
        self.failure_counts: Counter[str] = Counter()
        self._pool = _DaemonPool(max_workers)

    def close(self) -> None:
        """Stop the idle worker threads (a stuck one ends when its call returns)."""
        self._pool.shutdown()

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
        slots = asyncio.Semaphore(self.max_workers)  # bound to this run's loop
        per_spec = await asyncio.gather(
            *(self._run_spec(s, samples, failures, slots) for s in specs)
        )
        by_fn = {s.name: vals for s, vals in zip(specs, per_spec)}
        total = [sum(s.weight * by_fn[s.name][i] for s in specs) for i in range(len(samples))]
        for f in failures:
            self.failure_counts[f.fn] += 1
        return RewardResult(total=total, by_fn=by_fn, failures=failures)

    async def _call(self, spec: RewardSpec, arg: Any, slots: asyncio.Semaphore) -> Any:
        async with slots:  # the timeout starts once the call has a slot
            if spec.is_async:
                return await asyncio.wait_for(spec.fn(arg), timeout=self.timeout_s)
            return await self._call_sync(spec.fn, arg)

    async def _call_sync(self, fn: Callable[..., Any], arg: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(value: Any, error: Any) -> None:
            try:
                loop.call_soon_threadsafe(_resolve, fut, value, error)
            except RuntimeError:
                # The run ended (this call had timed out) and closed its loop; the timeout
                # was recorded then, so the late result has nobody to go to.
                log.debug("reward call finished after its run ended; result dropped")

        job = self._pool.submit(fn, arg, done)
        try:
            return await asyncio.wait_for(fut, timeout=self.timeout_s)
        except TimeoutError:
            self._pool.abandon(job)
            raise

    async def _guarded(
        self,
        spec: RewardSpec,
        arg: Any,
        index: int | None,
        failures: list[RewardFailure],
        slots: asyncio.Semaphore,
    ) -> Any:
        """The call's raw value, or _FAILED after recording why it failed."""
        try:
            return await self._call(spec, arg, slots)
        except TimeoutError:
            self._fail(failures, spec, index, "timeout", f"timed out after {self.timeout_s}s")
        except Exception as e:  # noqa: BLE001 - user code: an error becomes a recorded failure
            self._fail(failures, spec, index, "exception", f"{type(e).__name__}: {e}")
        return _FAILED

    async def _run_spec(
        self,
        spec: RewardSpec,
        samples: list[Sample],
        failures: list[RewardFailure],
        slots: asyncio.Semaphore,
    ) -> list[float]:
        if spec.is_batch:
            raw = await self._guarded(spec, samples, None, failures, slots)
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
            *(self._guarded(spec, s, i, failures, slots) for i, s in enumerate(samples))
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
