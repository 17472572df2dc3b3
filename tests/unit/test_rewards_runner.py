"""RewardRunner: parallel, time-limited, and failures become 0 plus a record, never a crash."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time
from pathlib import Path

import pytest

from orbit.data.sample import Sample
from orbit.rewards.custom import RewardSpec, batch_reward, load_callable, make_reward_spec
from orbit.rewards.runner import RewardRunner


def _samples(texts: list[str], label: object = 4) -> list[Sample]:
    return [
        Sample(prompt_ids=[1], response_text=t, label=label, index=i) for i, t in enumerate(texts)
    ]


def _raises(sample: Sample) -> float:
    raise RuntimeError(f"boom on {sample.index}")


def _nan(sample: Sample) -> float:
    return float("nan")


def _returns_none(sample: Sample) -> None:
    return None


def _sleeps(sample: Sample) -> float:
    time.sleep(0.6 if sample.index == 0 else 0.0)
    return 1.0


async def _async_len(sample: Sample) -> float:
    await asyncio.sleep(0.01)
    return float(len(sample.response_text))


async def _async_hangs(sample: Sample) -> float:
    await asyncio.sleep(30)
    return 1.0


@batch_reward
def _batch_index(samples: list[Sample]) -> list[float]:
    return [float(s.index) for s in samples]


@batch_reward
def _batch_wrong_length(samples: list[Sample]) -> list[float]:
    return [1.0]


def test_builtins_weighted_total_and_eval_mode_drops_format() -> None:
    specs = [make_reward_spec("arithmetic"), make_reward_spec("format", weight=0.1)]
    assert specs[1].train_only and not specs[0].train_only
    samples = _samples(["\\boxed{4}", "it is 4", "\\boxed{5}"])
    with RewardRunner(specs, timeout_s=5) as runner:
        res = runner.apply(samples)
        assert res.by_fn == {"arithmetic": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
        assert res.total == pytest.approx([1.1, 1.0, 0.1])
        assert [s.reward for s in samples] == pytest.approx([1.1, 1.0, 0.1])
        assert samples[2].rewards_by_fn == {"arithmetic": 0.0, "format": 1.0}
        ev = runner.run(samples, eval_mode=True)
        assert ev.total == [1.0, 1.0, 0.0] and set(ev.by_fn) == {"arithmetic"}
        assert not res.failures


def test_failures_become_zero_with_records(caplog: pytest.LogCaptureFixture) -> None:
    specs = [
        RewardSpec("raises", _raises),
        RewardSpec("nan", _nan),
        RewardSpec("none", _returns_none),
        RewardSpec("ok", make_reward_spec("arithmetic").fn, weight=2.0),
    ]
    samples = _samples(["\\boxed{4}", "\\boxed{3}"])
    with (
        caplog.at_level(logging.WARNING, logger="orbit.rewards"),
        RewardRunner(specs, timeout_s=5) as runner,
    ):
        res = runner.run(samples)
        assert res.total == [2.0, 0.0]
        assert res.by_fn["raises"] == [0.0, 0.0] and res.by_fn["nan"] == [0.0, 0.0]
        kinds = sorted((f.fn, f.sample_index, f.kind) for f in res.failures)
        assert kinds == [
            ("nan", 0, "non_finite"),
            ("nan", 1, "non_finite"),
            ("none", 0, "bad_value"),
            ("none", 1, "bad_value"),
            ("raises", 0, "exception"),
            ("raises", 1, "exception"),
        ]
        assert any("RuntimeError: boom on 1" in f.message for f in res.failures)
        assert runner.failure_counts == {"raises": 2, "nan": 2, "none": 2}
    assert "boom on 0" in caplog.text


def test_timeout_sync_and_async_runs_in_parallel() -> None:
    specs = [
        RewardSpec("sleepy", _sleeps),
        RewardSpec("hangs", _async_hangs),
        RewardSpec("alen", _async_len),
    ]
    samples = _samples(["ab", "abc", "a"])
    with RewardRunner(specs, timeout_s=0.3, max_workers=4) as runner:
        t0 = time.perf_counter()
        res = runner.run(samples)
        elapsed = time.perf_counter() - t0
    # calls ran concurrently under one 0.3 s limit (serially the four timeouts alone take 1.2 s)
    assert elapsed < 1.0, elapsed
    assert res.by_fn["sleepy"] == [0.0, 1.0, 1.0]
    assert res.by_fn["hangs"] == [0.0, 0.0, 0.0]
    assert res.by_fn["alen"] == [2.0, 3.0, 1.0]
    timeouts = sorted((f.fn, f.sample_index) for f in res.failures if f.kind == "timeout")
    assert timeouts == [("hangs", 0), ("hangs", 1), ("hangs", 2), ("sleepy", 0)]
    assert "timed out after 0.3s" in res.failures[0].message


def test_batch_functions() -> None:
    specs = [RewardSpec("idx", _batch_index), RewardSpec("short", _batch_wrong_length)]
    with RewardRunner(specs) as runner:
        res = runner.run(_samples(["a", "b", "c"]))
    assert res.by_fn["idx"] == [0.0, 1.0, 2.0]
    assert res.by_fn["short"] == [0.0, 0.0, 0.0]
    assert [(f.fn, f.sample_index, f.kind) for f in res.failures] == [("short", None, "bad_value")]


def test_arun_inside_event_loop() -> None:
    async def main() -> list[float]:
        with RewardRunner([RewardSpec("alen", _async_len)]) as runner:
            return (await runner.arun(_samples(["xyz"]))).total

    assert asyncio.run(main()) == [3.0]


def test_load_callable_from_module_and_file(tmp_path: Path) -> None:
    assert load_callable("orbit.rewards.verifiers:format_score")("\\boxed{1}") == 1.0
    f = tmp_path / "my_rewards.py"
    f.write_text(
        textwrap.dedent("""
        from orbit.rewards.custom import batch_reward

        def length_bonus(sample):
            return min(len(sample.response_text), 10) / 10

        @batch_reward
        async def all_ones(samples):
            return [1.0] * len(samples)
    """)
    )
    spec = make_reward_spec(f"{f}:length_bonus", weight=0.5)
    batch = make_reward_spec(f"{f}:all_ones")
    assert spec.name == "length_bonus" and not spec.is_batch
    assert batch.is_batch and batch.is_async
    with RewardRunner([spec, batch]) as runner:
        res = runner.run(_samples(["12345", "x" * 50]))
    assert res.total == pytest.approx([0.25 + 1.0, 0.5 + 1.0])


def test_bad_specs_raise_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected 'module:function'"):
        load_callable("no_colon")
    with pytest.raises(ValueError, match="does not exist"):
        load_callable(f"{tmp_path}/missing.py:fn")
    with pytest.raises(ValueError, match="no callable 'nope'"):
        load_callable("orbit.rewards.verifiers:nope")
    with pytest.raises(ValueError, match="unique"):
        RewardRunner([RewardSpec("a", _nan), RewardSpec("a", _nan)])


def test_timeout_counts_from_start_not_from_queueing() -> None:
    # 6 calls of 0.1 s on 2 slots take ~0.3 s in all; each call alone is well under 0.25 s,
    # so none may time out even though the last ones wait 0.2 s for a slot.
    lock = threading.Lock()
    state = {"now": 0, "peak": 0}

    def slow(sample: Sample) -> float:
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.1)
        with lock:
            state["now"] -= 1
        return 1.0

    with RewardRunner([RewardSpec("slow", slow)], timeout_s=0.25, max_workers=2) as runner:
        t0 = time.perf_counter()
        res = runner.run(_samples(["a"] * 6))
        elapsed = time.perf_counter() - t0
    assert res.total == [1.0] * 6 and not res.failures
    assert state["peak"] == 2
    assert elapsed > 0.28, elapsed  # 3 waves of 0.1 s: the slot limit held


def test_hung_calls_do_not_starve_later_calls() -> None:
    # Both workers get stuck on calls that outlive the timeout; the pool replaces them, so
    # the quick calls queued behind still run (and are not charged the stuck time).
    def f(sample: Sample) -> float:
        time.sleep(0.6 if sample.index < 2 else 0.01)
        return 1.0

    with RewardRunner([RewardSpec("f", f)], timeout_s=0.2, max_workers=2) as runner:
        t0 = time.perf_counter()
        res = runner.run(_samples(["a"] * 6))
        elapsed = time.perf_counter() - t0
    assert res.by_fn["f"] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert [(f.sample_index, f.kind) for f in res.failures] == [(0, "timeout"), (1, "timeout")]
    # Without replacement threads the quick calls would sit 0.4 s in the queue and time out.
    assert elapsed < 0.6 + 0.5, elapsed
