"""LR schedule, micro-batching, driver helpers (advantages, rollout metrics), metrics sinks,
work splitting and placement."""

from __future__ import annotations

import json
import math

import pytest

from orbit.config import AlgoConfig
from orbit.data.sample import Sample
from orbit.orchestration.group import split_by_tokens, split_chunks
from orbit.orchestration.placement import resolve_placement
from orbit.orchestration.steps import (
    assign_advantages,
    mini_batches,
    reduce_train_metrics,
    rollout_metrics,
)
from orbit.trainer.batching import micro_batches
from orbit.trainer.metrics import MetricsLogger, plot_curves, read_metrics, wandb_enabled
from orbit.trainer.schedule import lr_factor


def test_lr_warmup_then_decay() -> None:
    f = [lr_factor(s, warmup=4, total=12, style="cosine", min_ratio=0.1) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_factor(7, warmup=0, total=10, style="linear", min_ratio=0.0) == pytest.approx(0.3)
    assert lr_factor(100, warmup=2, total=10, style="constant", min_ratio=0.0) == 1.0
    with pytest.raises(ValueError, match="lr-decay-style"):
        lr_factor(0, warmup=0, total=1, style="step", min_ratio=0.0)


def sample(p: int, r: int, group: int = 0, reward: float = 0.0, finish: str = "stop") -> Sample:
    return Sample(prompt_ids=list(range(1, p + 1)), response_ids=[5] * r, rollout_logprobs=[-1.0] * r,
                  group_id=group, reward=reward, finish_reason=finish)


def test_micro_batches_respect_the_token_budget() -> None:
    ss = [sample(1, 2), sample(2, 2), sample(1, 1), sample(3, 3), sample(10, 10)]  # 3, 4, 2, 6, 20 tokens
    mbs = micro_batches(ss, 10)
    assert mbs == [[0, 1, 2], [3], [4]]  # consecutive, order kept; the 20-token one alone
    assert sorted(i for mb in mbs for i in mb) == list(range(5))
    for mb in mbs:
        assert len(mb) == 1 or sum(len(ss[i].prompt_ids) + len(ss[i].response_ids) for i in mb) <= 10


def test_grpo_advantages_and_rollout_metrics() -> None:
    ss = [sample(2, 3, 0, 1.0), sample(2, 1, 0, 0.0), sample(2, 2, 1, 1.0, "length"), sample(2, 2, 1, 1.0)]
    for s in ss:
        s.rewards_by_fn = {"arithmetic": s.reward}
    assign_advantages(ss, AlgoConfig(advantage_estimator="grpo"))
    a = [s.metadata["advantages"] for s in ss]
    assert [len(x) for x in a] == [3, 1, 2, 2]
    assert a[0][0] > 0 > a[1][0] and a[0] == [a[0][0]] * 3 and a[2] == [0.0, 0.0]
    m = rollout_metrics(ss)
    assert m["rollout/reward_mean"] == 0.75 and m["rollout/truncated_ratio"] == 0.25
    assert m["rollout/zero_std_group_frac"] == 0.5 and m["rollout/response_len_max"] == 3
    assert m["rollout/reward_arithmetic_mean"] == 0.75
    assert not any(k.startswith("reward/failures") for k in m)
    ss[1].metadata["reward_failures"] = ["arithmetic"]
    assert rollout_metrics(ss)["reward/failures/arithmetic"] == 1.0
    assert m["rollout/reward_std"] == pytest.approx(math.sqrt(0.1875))


def test_mini_batches_and_metric_reduction() -> None:
    assert mini_batches(list(range(8)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="global batches"):
        mini_batches(list(range(6)), 4)
    out = reduce_train_metrics([{"train/pg_loss": 1.0, "train/x_max": 2.0, "perf/train_time": 1.0},
                                {"train/pg_loss": 3.0, "train/x_max": 5.0, "perf/train_time": 2.0}])
    assert out == {"train/pg_loss": 2.0, "train/x_max": 5.0, "perf/train_time": 3.0}


def test_work_splitting() -> None:
    assert split_chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    ss = [sample(10, 10), sample(1, 1), sample(5, 5), sample(4, 4)]
    shards = split_by_tokens(ss, 2)
    loads = [sum(len(s.prompt_ids) + len(s.response_ids) for s in sh) for sh in shards]
    assert sorted(loads) == [20, 20]


def test_placement() -> None:
    assert resolve_placement("auto", 0, 0, 8).device == "cpu"
    p = resolve_placement("auto", 0, 4, 64)
    assert (p.device, p.num_workers, p.cpus_per_worker) == ("cuda", 4, 16)
    assert resolve_placement("cpu", 2, 4, 8).num_workers == 2
    with pytest.raises(ValueError, match="no GPU"):
        resolve_placement("cuda", 0, 0, 8)
    with pytest.raises(ValueError, match="num-workers"):
        resolve_placement("cuda", 3, 2, 8)


def test_metrics_logger_jsonl_truncate_and_plot(tmp_path) -> None:
    log = MetricsLogger(tmp_path, total_steps=3)
    log.log(0, {"eval/pass@1": 0.1})
    for step in (1, 2, 3):
        log.log(step, {"rollout/reward_mean": step / 10, "perf/step_time": 1.0})
    log.truncate_after(2)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[2]["rollout/reward_mean"] == 0.2
    png = log.close(plot=True)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(TypeError, match="must be a number"):
        log.log(4, {"x": "nan"})
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_wandb_auto(tmp_path) -> None:
    assert not wandb_enabled("auto", home=str(tmp_path))
    (tmp_path / ".wandb_key").write_text("k")
    assert wandb_enabled("auto", home=str(tmp_path)) and not wandb_enabled("0", home=str(tmp_path))
    with pytest.raises(ValueError, match="use-wandb"):
        wandb_enabled("yes")
