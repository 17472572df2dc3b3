"""Atomic, resumable checkpoints of everything a run needs to continue bit for bit.

A checkpoint is a directory `<run>/checkpoints/step_000007/` holding the adapter in PEFT format
(`adapter/`, rank 0), the optimizer and LR-scheduler state (`optim.pt`, rank 0), one RNG file
per worker (`rng_rank{r}.pt`: python, numpy, torch CPU/CUDA and any extra generators such as
the sampler's) and the driver's state (`driver.json`: step, data position). It is written into
a hidden temporary directory, every file is fsynced, and only then `os.replace` moves it into
place and the `latest` pointer is swapped, so a run killed at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"


def step_dirname(step: int) -> str:
    return f"step_{step:06d}"


def begin(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory to write the step-`step` checkpoint into."""
    tmp = Path(run_dir) / CKPT_DIRNAME / f".tmp-{step_dirname(step)}"
    if tmp.exists():  # left over from a run killed mid-write; it was never committed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, step: int, keep: int = 2) -> Path:
    """fsync `tmp`, move it to its final name, point `latest` at it, prune old checkpoints."""
    root = tmp.parent
    final = root / step_dirname(step)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. final save right after an interval save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / f".{LATEST}.tmp"
    pointer_tmp.write_text(final.name + "\n")
    with open(pointer_tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    if keep > 0:
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The committed checkpoint `latest` points to, or None when the run has none."""
    root = Path(run_dir) / CKPT_DIRNAME
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "driver.json").is_file():
        raise ValueError(f"{pointer} points to {path}, which is not a complete checkpoint")
    return path


# ---- pieces each party writes -----------------------------------------------------------
def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise ValueError(f"checkpoint has no state for generator {name!r}")
        g.set_state(state["generators"][name])


def save_rng(ckpt: Path, rank: int, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.save(rng_state(generators), ckpt / f"rng_rank{rank}.pt")


def load_rng(ckpt: Path, rank: int, generators: dict[str, torch.Generator] | None = None) -> None:
    path = ckpt / f"rng_rank{rank}.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing: was this checkpoint written with fewer workers?")
    set_rng_state(torch.load(path, weights_only=False), generators)


def save_optim(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
               master: list[torch.Tensor] | None = None) -> None:
    """Optimizer + scheduler state, and the float32 master weights when they exist (the PEFT
    file holds the adapter rounded to its dtype, not enough to resume bit for bit)."""
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "optim_step": step, "master": [m.detach().cpu() for m in master or []]},
               ckpt / "optim.pt")


def load_optim(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any,
               master: list[torch.Tensor] | None = None) -> int:
    path = ckpt / "optim.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    state = torch.load(path, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if master is not None:
        saved = state.get("master", [])
        if len(saved) != len(master):
            raise ValueError(f"{path} holds {len(saved)} master tensors, the adapter has {len(master)}")
        with torch.no_grad():
            for m, t in zip(master, saved):
                m.copy_(t)
    return int(state["optim_step"])


def save_driver(ckpt: Path, state: dict[str, Any]) -> None:
    (ckpt / "driver.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def load_driver(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "driver.json").read_text())
