"""scripts/bench/bench_qmm.py --gemv-paths: which of a shape's timed paths a short device call
keeps (fnmatch patterns over the path names; the default keeps every path)."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench

pytest.importorskip("triton")


def _bench():
    mod = load_bench("bench_qmm")
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
