"""Reward functions named on the command line: built-ins or user code by path.

A spec string is one of
  "math" / "arithmetic" / "countdown" / "format"   a built-in (verifiers.BUILTIN_REWARDS)
  "my_pkg.rewards:score"                            module:function, imported normally
  "path/to/rewards.py:score"                        a file, imported under a private name
The function takes a `Sample` and returns a float, or (batch form) takes a list of samples
and returns a list of floats; either may be `async def`. Mark the batch form with
`@batch_reward` or `RewardSpec(batch=True)`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orbit.rewards.verifiers import BUILTIN_REWARDS

BATCH_ATTR = "orbit_batch_reward"


def batch_reward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark `fn(samples: list[Sample]) -> list[float]` as a batch reward function."""
    setattr(fn, BATCH_ATTR, True)
    return fn


def load_callable(spec: str) -> Callable[..., Any]:
    """Resolve "module:function" or "path/to/file.py:function" to the function object."""
    if ":" not in spec:
        raise ValueError(
            f"reward function {spec!r}: expected 'module:function' or 'file.py:function'"
        )
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward function {spec!r}: empty module or function name")
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function {spec!r}: file {path} does not exist")
        # A stable private module name per file, so two files named rewards.py don't collide.
        mod_name = f"_orbit_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert file_spec is not None and file_spec.loader is not None
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward function {spec!r}: {target} has no callable {name!r}")
    return fn


@dataclass(frozen=True)
class RewardSpec:
    """One term of the reward: total = sum(weight * fn(sample)) over the specs.
    `train_only` terms (the format bonus) are skipped in eval mode."""

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    batch: bool | None = None  # None: read the @batch_reward mark
    train_only: bool = False

    @property
    def is_batch(self) -> bool:
        return bool(getattr(self.fn, BATCH_ATTR, False)) if self.batch is None else self.batch

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)


def make_reward_spec(
    spec: str, weight: float = 1.0, batch: bool | None = None, train_only: bool | None = None
) -> RewardSpec:
    """Build a RewardSpec from a spec string; the built-in "format" is train_only by default."""
    if spec in BUILTIN_REWARDS:
        fn, name = BUILTIN_REWARDS[spec], spec
    else:
        fn, name = load_callable(spec), spec.rpartition(":")[2]
    only = (spec == "format") if train_only is None else train_only
    return RewardSpec(name=name, fn=fn, weight=weight, batch=batch, train_only=only)
