"""scripts/bench/bench_qmm.py --gemv-paths: which of a shape's timed paths a short device call
keeps (fnmatch patterns over the path names; the default keeps every path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "scripts/bench"))
    spec = importlib.util.spec_from_file_location("bench_qmm", ROOT / "scripts/bench/bench_qmm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gemv_paths_filter_the_plan() -> None:
    keep = _bench().keep_paths
    plan = [("fused-dot", None), ("gemv", 1), ("gemv-s5", 2), ("gemv-pdl", 3),
            ("gemv-pdl-l2", 4), ("gemv-hot", 5)]
    assert keep(plan, ("*",)) == plan
    assert keep(plan, ("gemv", "fused-dot")) == [("fused-dot", None), ("gemv", 1)]
    assert keep(plan, ("gemv-pdl*",)) == [("gemv-pdl", 3), ("gemv-pdl-l2", 4)]
    assert keep(plan, (" gemv-hot",)) == [("gemv-hot", 5)]  # (spaces after commas)
    assert keep(plan, ("nothing",)) == []
