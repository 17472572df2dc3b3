"""A run killed after step k and resumed from its checkpoint logs the same metrics as an
uninterrupted run (tiny random model, CPU, fixed seeds, in-process worker)."""

from __future__ import annotations

import pytest
from tiny_policy import TINY_REWARD, save_tiny_policy, write_arithmetic_jsonl

from orbit.config import parse_args
from orbit.orchestration import driver
from orbit.trainer import checkpoint as ckpt
from orbit.trainer.metrics import MetricsLogger, read_metrics


class Killed(RuntimeError):
    pass


def config(tmp_path, run: str):
    model = tmp_path / "model"
    if not model.exists():
        save_tiny_policy(model)
        write_arithmetic_jsonl(tmp_path / "train.jsonl", 12)
    return parse_args([
        "--hf-checkpoint", str(model), "--prompt-data", str(tmp_path / "train.jsonl"), "--no-use-ray",
        "--num-rollout", "4", "--rollout-batch-size", "2", "--n-samples-per-prompt", "4",
        "--global-batch-size", "4", "--rollout-max-response-len", "6", "--max-prompt-len", "32",
        "--lr", "5e-2", "--lr-warmup-steps", "2", "--lr-decay-style", "cosine", "--save-interval", "1",
        "--use-wandb", "0", "--no-plot", "--save", str(tmp_path / run), "--seed", "7",
        # a reward the random model earns sometimes, so advantages (and updates) are non-zero
        "--reward", TINY_REWARD, "--no-apply-chat-template",
    ])


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_resume_reproduces_uninterrupted_metrics(tmp_path, monkeypatch) -> None:
    full = driver.train(config(tmp_path, "full"))
    reference = comparable(read_metrics(full / "metrics.jsonl"))
    assert [r["step"] for r in reference] == [1, 2, 3, 4]

    real_log = MetricsLogger.log

    def log_then_die(self, step, metrics):
        if step == 3:  # step 3 ran but was never checkpointed: the "kill"
            raise Killed()
        real_log(self, step, metrics)

    monkeypatch.setattr(MetricsLogger, "log", log_then_die)
    with pytest.raises(Killed):
        driver.train(config(tmp_path, "killed"))
    assert ckpt.latest_checkpoint(tmp_path / "killed").name == "step_000002"
    monkeypatch.setattr(MetricsLogger, "log", real_log)

    resumed = driver.train(config(tmp_path, "killed"))
    got = comparable(read_metrics(resumed / "metrics.jsonl"))
    assert got == reference
    assert any(r["train/grad_norm"] > 0 for r in reference)  # it did train
