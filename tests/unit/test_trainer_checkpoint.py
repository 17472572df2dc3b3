"""Atomic checkpoints: commit/latest/prune, RNG and optimizer round trips, torn writes ignored."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from orbit.trainer import checkpoint as ckpt
from orbit.trainer.schedule import build_scheduler


def test_commit_points_latest_and_prunes(tmp_path) -> None:
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        tmp = ckpt.begin(tmp_path, step)
        ckpt.save_driver(tmp, {"step": step})
        final = ckpt.commit(tmp, step, keep=2)
        assert final.name == f"step_{step:06d}" and not tmp.exists()
    assert ckpt.latest_checkpoint(tmp_path) == final
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    assert ckpt.load_driver(final) == {"step": 3}


def test_uncommitted_write_is_invisible_and_cleaned(tmp_path) -> None:
    tmp = ckpt.begin(tmp_path, 1)
    ckpt.save_driver(tmp, {"step": 1})
    ckpt.commit(tmp, 1)
    torn = ckpt.begin(tmp_path, 2)  # "killed" before commit
    (torn / "optim.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000001"
    again = ckpt.begin(tmp_path, 2)  # a resumed run starts the same step over
    assert not (again / "optim.pt").exists()


def test_latest_pointing_at_incomplete_dir_is_an_error(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    (root / "step_000004").mkdir(parents=True)
    (root / "latest").write_text("step_000004\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.latest_checkpoint(tmp_path)


def test_rng_round_trip(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_rng(tmp_path, 0, {"sampler": gen})
    expect = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.load_rng(tmp_path, 0, {"sampler": gen})
    got = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    assert expect[0] == got[0] and expect[1] == got[1]
    assert torch.equal(expect[2], got[2]) and torch.equal(expect[3], got[3])
    with pytest.raises(ValueError, match="rng_rank1"):
        ckpt.load_rng(tmp_path, 1)


def test_optimizer_and_scheduler_round_trip(tmp_path) -> None:
    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = torch.optim.AdamW([p], lr=1e-2)
        return p, opt, build_scheduler(opt, lr=1e-2, warmup=3, total=10, style="cosine", min_lr=0.0)

    def step(p, opt, sched):
        opt.zero_grad()
        (p.square().sum()).backward()
        opt.step()
        sched.step()

    p, opt, sched = make()
    for _ in range(2):
        step(p, opt, sched)
    ckpt.save_optim(tmp_path, opt, sched, 2)
    saved = p.detach().clone()
    step(p, opt, sched)
    p2, opt2, sched2 = make()
    with torch.no_grad():
        p2.copy_(saved)
    assert ckpt.load_optim(tmp_path, opt2, sched2) == 2
    step(p2, opt2, sched2)
    assert torch.equal(p, p2) and sched.get_last_lr() == sched2.get_last_lr()
