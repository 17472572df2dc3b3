"""scripts/bench/bench_train.py --small runs end to end on CPU: both sections report positive
throughput, no row fails, and the int4 base takes < 0.35x the bf16 base's bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_small(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench/bench_train.py", "--small", "--out", str(tmp_path)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    assert {r["section"] for r in rows} == {"dense", "moe"}
    assert all(r["tokens_per_s"] > 0 for r in rows)
    dense = [r for r in rows if r["section"] == "dense"]
    for shape in {r["shape"] for r in dense}:
        by_fmt = {r["format"]: r for r in dense if r["shape"] == shape}
        assert set(by_fmt) == {"bf16", "int4"}
        ratio = by_fmt["int4"]["base_weight_bytes"] / by_fmt["bf16"]["base_weight_bytes"]
        assert ratio < 0.35, (shape, ratio)
        assert by_fmt["int4"]["base_bytes_vs_bf16"] == ratio
    moe = [r for r in rows if r["section"] == "moe"]
    assert moe and all(r["format"] == "int4" and r["trainable_params"] > 0 for r in moe)
    assert "| section |" in proc.stdout  # the markdown table is printed last
