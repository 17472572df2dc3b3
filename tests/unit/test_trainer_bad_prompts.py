"""A prompt the engine refuses (empty, longer than the context) fails alone in RL: the worker
returns its samples as "error" samples, unscored; the driver drops them from their GRPO group
with a warning naming the prompt, and raises only when every prompt of a step failed."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_policy import TINY_REWARD, save_tiny_policy

from orbit.config import parse_args
from orbit.data.sample import Sample
from orbit.orchestration.driver import train
from orbit.orchestration.steps import assign_advantages, drop_failed_samples, mini_batches
from orbit.trainer.metrics import read_metrics
from orbit.trainer.worker import PolicyWorker

LONG = "<|user|>" + "9" * 60 + "<|end|><|assistant|>"  # > max_prompt_len + response: no room


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def worker(model_dir) -> PolicyWorker:
    cfg = parse_args(["--hf-checkpoint", str(model_dir), "--prompt-data", "unused",
                      "--rollout-batch-size", "3", "--n-samples-per-prompt", "2",
                      "--rollout-max-response-len", "4", "--max-prompt-len", "32",
                      "--reward", TINY_REWARD, "--eval-max-response-len", "4"])
    return PolicyWorker(cfg)


ROWS = [{"text": "<|user|>1+2=<|end|><|assistant|>", "label": 3, "group_id": 10},
        {"text": LONG, "label": 0, "group_id": 11},
        {"text": "<|user|>4+4=<|end|><|assistant|>", "label": 8, "group_id": 12}]


def test_worker_rollout_survives_an_over_long_prompt(worker: PolicyWorker) -> None:
    samples = worker.rollout(ROWS, step=1)
    assert [s.group_id for s in samples] == [10, 10, 11, 11, 12, 12]
    bad = [s for s in samples if s.group_id == 11]
    assert all(s.finish_reason == "error" and s.response_ids == [] and s.reward == 0.0 for s in bad)
    err = bad[0].metadata["rollout_error"]
    assert err.startswith("prompt has ") and "max_model_len" in err and "request" not in err
    assert all(s.rewards_by_fn == {} for s in bad)  # never scored
    good = [s for s in samples if s.group_id != 11]
    assert all(s.finish_reason in ("stop", "length") and s.response_ids for s in good)
    assert all("digit_reward" in s.rewards_by_fn for s in good)
    # an empty prompt (the tiny tokenizer adds no BOS) is refused the same way
    (a, b) = worker.rollout([{"text": "", "label": 0, "group_id": 0}], step=2)
    assert a.finish_reason == b.finish_reason == "error" and "empty" in a.metadata["rollout_error"]


def test_eval_counts_a_refused_prompt_as_misses(worker: PolicyWorker, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="orbit.trainer"):
        table = worker.evaluate(ROWS, step=0)
    k = worker.cfg.eval.n_samples_per_eval_prompt
    assert len(table) == 3 and table[1] == [0.0] * k
    assert any("group 11" in r.getMessage() and "max_model_len" in r.getMessage() for r in caplog.records)


def _s(gid: int, reason: str = "stop", err: str | None = None) -> Sample:
    s = Sample(prompt_ids=[1], response_ids=[] if reason == "error" else [2, 3],
               group_id=gid, finish_reason=reason)
    if err is not None:
        s.metadata["rollout_error"] = err
    return s


def test_drop_failed_samples_warns_per_prompt(caplog) -> None:
    samples = [_s(20), _s(20), _s(21, "error", "prompt is empty"), _s(21, "error", "prompt is empty"),
               _s(22), _s(22, "error", "boom")]
    with caplog.at_level(logging.WARNING, logger="orbit.trainer"):
        kept = drop_failed_samples(samples, first_group=20)
    assert kept == [samples[0], samples[1], samples[4]]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert "prompt 1 (group 21): 2 of 2 samples" in msgs[0] and "group skipped" in msgs[0]
    assert msgs[0].endswith("prompt is empty")
    assert "prompt 2 (group 22): 1 of 2" in msgs[1] and "the other 1 kept" in msgs[1]
    # the kept sample of group 22 is its group's only member: advantage 0, not NaN
    kept[2].reward = 1.0
    assign_advantages(kept, parse_args(["--prompt-data", "x"]).algo)
    assert kept[2].metadata["advantages"] == [0.0, 0.0]
    assert drop_failed_samples([_s(0), _s(0)]) == [_s(0), _s(0)] and drop_failed_samples([]) == []


def test_every_prompt_failing_raises_a_clear_error() -> None:
    samples = [_s(4, "error", "prompt has 99 tokens, ..."), _s(5, "error", "prompt is empty")]
    with pytest.raises(ValueError, match=r"every prompt of the step \(2\) failed in the rollout "
                                         r"engine.*prompt 0: prompt has 99 tokens.*prompt 1: prompt is empty"):
        drop_failed_samples(samples, first_group=4)


def test_mini_batches_after_drops_keep_whole_groups() -> None:
    samples = [_s(g) for g in (0, 0, 1, 1, 3, 3)]  # group 2 was dropped: 6 of 8
    with pytest.raises(ValueError, match="global batches"):
        mini_batches(samples, 4)
    mbs = mini_batches(samples, 4, partial=True)
    assert [[s.group_id for s in mb] for mb in mbs] == [[0, 0, 1, 1], [3, 3]]
    one = mini_batches(samples[:3], 8, partial=True)  # less than one global batch left
    assert one == [samples[:3]]
    assert mini_batches(samples[:4], 2, partial=True) == [samples[:2], samples[2:4]]


def _write(path, prompts: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "label": 1}) + "\n" for p in prompts))
    return str(path)


def _cfg(model_dir, tmp_path, data: str, *extra: str):
    return parse_args([
        "--hf-checkpoint", str(model_dir), "--prompt-data", data, "--no-use-ray",
        "--num-rollout", "1", "--rollout-batch-size", "4", "--n-samples-per-prompt", "2",
        "--rollout-max-response-len", "4", "--max-prompt-len", "16", "--no-apply-chat-template",
        "--reward", TINY_REWARD, "--use-wandb", "0", "--no-plot", "--save", str(tmp_path / "run"),
        "--save-interval", "0", *extra,
    ])


def test_driver_step_with_one_bad_prompt_trains_on_the_rest(model_dir, tmp_path, caplog) -> None:
    data = _write(tmp_path / "train.jsonl", ["1+2=", "9" * 40, "3+4=", "5+5="])
    cfg = _cfg(model_dir, tmp_path, data, "--global-batch-size", "4")  # 2 optimizer steps
    with caplog.at_level(logging.WARNING, logger="orbit.trainer"):
        run = train(cfg)
    (row,) = read_metrics(run / "metrics.jsonl")
    assert row["rollout/failed_samples"] == 2.0 and row["rollout/num_samples"] == 6.0
    warned = [r.getMessage() for r in caplog.records if "failed in the rollout engine" in r.getMessage()]
    assert len(warned) == 1 and "2 of 2 samples" in warned[0] and "group skipped" in warned[0]
    assert "prompt has 40 tokens" in warned[0]


def test_driver_step_where_every_prompt_is_bad_raises(model_dir, tmp_path) -> None:
    data = _write(tmp_path / "train.jsonl", ["9" * 40, "8" * 50, "7" * 60, "6" * 70])
    with pytest.raises(ValueError, match=r"every prompt of the step \(4\) failed"):
        train(_cfg(model_dir, tmp_path, data))
