"""scripts/bench/*.py loaded as modules for CPU tests of their pure parts (summaries, filters,
offline compiles). The scripts import their siblings by name, so their folder goes on
sys.path first."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def load_bench(name: str) -> ModuleType:
    """scripts/bench/<name>.py as a fresh module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
