"""Data parallel is exact: two Ray CPU workers that all-reduce adapter gradients (gloo) end one
optimizer step with the same adapter as one worker on the same global batch.

The adapter is kept in float32 here: with bf16 adapter weights each micro-batch's gradient is
rounded to bf16 before it reaches the float32 master copy, and a different split of the batch
rounds differently, so the comparison would measure bf16 noise, not the all-reduce."""

from __future__ import annotations

import torch
from tiny_policy import TINY_REWARD, save_tiny_policy

from orbit.config import parse_args
from orbit.orchestration.group import WorkerGroup
from orbit.orchestration.steps import assign_advantages


def config(model, *extra: str):
    return parse_args([
        "--hf-checkpoint", str(model), "--prompt-data", "unused", "--device", "cpu", "--cpu-threads", "1",
        "--rollout-batch-size", "4", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "8",
        "--max-prompt-len", "32", "--lr", "1e-2", "--reward", TINY_REWARD, "--no-apply-chat-template",
        "--max-tokens-per-micro-batch", "40", "--kl-coef", "0.05", "--adapter-dtype", "float32", *extra,
    ])


def test_two_workers_match_one(tmp_path) -> None:
    model = save_tiny_policy(tmp_path / "model")
    rows = [{"text": f"{a}+{a}=", "label": 2 * a, "group_id": a} for a in range(4)]

    one = WorkerGroup(config(model, "--no-use-ray"))
    samples = one.rollout(rows, step=1)
    assert len({s.reward for s in samples}) == 2  # both outcomes occur: real advantages
    assign_advantages(samples, one.cfg.algo)
    init = one.call_all("adapter_state")[0]
    m1 = one.train(samples)
    want = one.call_all("adapter_state")[0]

    two = WorkerGroup(config(model, "--num-workers", "2"))
    try:
        assert two.size == 2
        assert all(torch.equal(init[k], two.call_all("adapter_state")[1][k]) for k in init)
        m2 = two.train(samples)
        got0, got1 = two.call_all("adapter_state")
        assert two.push_adapter() >= 0
    finally:
        two.shutdown()

    moved = max((want[k] - init[k]).abs().max().item() for k in want)
    assert moved > 1e-3  # the step did change the adapter
    for k in want:
        assert torch.equal(got0[k], got1[k]), f"workers disagree on {k}"
        # Adam's first step is lr * g / (|g| + eps): float32 summation-order noise in a tiny g
        # moves it by up to ~1e-6 here, so the bound is 1e-3 of one step (lr = 1e-2).
        torch.testing.assert_close(got0[k], want[k], rtol=0, atol=1e-5, msg=k)
    for k in ("train/pg_loss", "train/grad_norm", "train/kl"):
        assert abs(m1[k] - m2[k]) <= 1e-4 * max(1.0, abs(m1[k])), (k, m1[k], m2[k])
