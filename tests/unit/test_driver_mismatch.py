"""The driver feeds the worker's train-vs-rollout metrics to MismatchMonitor under its names."""

from __future__ import annotations

from orbit.alignment.monitor import MismatchMonitor
from orbit.orchestration.driver import _mismatch_view


def test_mismatch_view_maps_worker_metrics_and_monitor_flags_a_jump() -> None:
    m = {"train/train_rollout_logprob_abs_diff_mean": 0.01,
         "train/train_rollout_logprob_abs_diff_max": 0.2, "train/train_rollout_kl_k3": 1e-4,
         "train/pg_loss": 0.5}
    assert _mismatch_view(m) == {"mean_abs": 0.01, "max_abs": 0.2, "kl_k3": 1e-4}
    mon = MismatchMonitor()
    for step in range(1, 6):
        assert mon.update(step, _mismatch_view(m)) == []
    jumped = dict(m, **{"train/train_rollout_logprob_abs_diff_mean": 0.5})
    jumps = mon.update(6, _mismatch_view(jumped))
    assert [j.metric for j in jumps] == ["mean_abs"] and jumps[0].step == 6
    assert MismatchMonitor(exact=True).update(1, {"mean_abs": 1e-9})  # exact promises 0
