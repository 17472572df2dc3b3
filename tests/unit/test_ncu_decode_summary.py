"""scripts/bench/ncu_decode.py's summary of an Nsight Compute CSV log (the part that runs on
this machine, after the device call): kernels grouped by name, durations and DRAM bytes in
any of ncu's units, the log's leading ==PROF== lines and extra columns skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_bench

HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
          '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
          '"Metric Value","Estimated Speedup"')


def _row(i: int, name: str, metric: str, unit: str, value: str) -> str:
    return (f'"{i}","7","python3","localhost","{name}","1","7","(128, 1, 1)","(64, 2, 1)","0",'
            f'"9.0","Command line profiler metrics","{metric}","{unit}","{value}",""')


def _log(tmp_path: Path) -> Path:
    lines = ["==PROF== Connected to process 7 (/usr/bin/python3)", HEADER]
    # two steps of: a GEMV (2.5 us, 2.1 MB), an attention kernel (1,500 ns, 10 KB)
    for step in range(2):
        g, a = 2 * step, 2 * step + 1
        lines += [_row(g, "_gemv_planes_kernel", "gpu__time_duration.sum", "usecond", "2.50"),
                  _row(g, "_gemv_planes_kernel", "dram__bytes_read.sum", "Mbyte", "2.10"),
                  _row(g, "_gemv_planes_kernel", "launch__grid_size", "", "128"),
                  _row(g, "_gemv_planes_kernel", "launch__registers_per_thread",
                       "register/thread", "96"),
                  _row(a, "_attn_decode_kernel", "gpu__time_duration.sum", "nsecond", "1,500"),
                  _row(a, "_attn_decode_kernel", "dram__bytes_read.sum", "Kbyte", "10.00")]
    p = tmp_path / "ncu.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_summary_groups_kernels_per_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mod = load_bench("ncu_decode")
    mod.summarize(str(_log(tmp_path)), steps=2)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("4 kernels, 8.0 us in all = 4.0 us per step")
    gemv = next(ln.split() for ln in out if ln.endswith("_gemv_planes_kernel"))
    attn = next(ln.split() for ln in out if ln.endswith("_attn_decode_kernel"))
    # per step, mean us, us/step, MB/launch, GB/s, grid, regs
    assert gemv[:7] == ["1.00", "2.50", "2.5", "2.10", "840", "128", "96"]
    assert attn[:5] == ["1.00", "1.50", "1.5", "0.01", "7"]


def test_fit_of_fixed_cost_over_launch_shapes(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Two GEMV shapes (2 MB in 3 us, 6 MB in 5 us, the first launched twice as often) lie on
    us = 2 + 0.5 * MB: 2 us fixed, 2000 GB/s once streaming; the attention kernel is left out
    of the fit."""
    mod = load_bench("ncu_decode")
    lines = [HEADER]
    for i, (name, us, mb) in enumerate([("_gemv_planes_kernel", "3.00", "2.00"),
                                        ("_gemv_planes_kernel", "3.00", "2.00"),
                                        ("_gemv_planes_kernel", "5.00", "6.00"),
                                        ("_attn_decode_kernel", "9.00", "0.01")]):
        lines += [_row(i, name, "gpu__time_duration.sum", "usecond", us),
                  _row(i, name, "dram__bytes_read.sum", "Mbyte", mb)]
    p = tmp_path / "ncu.csv"
    p.write_text("\n".join(lines) + "\n")
    mod.summarize(str(p), steps=1)
    out = capsys.readouterr().out.splitlines()
    fit = next(ln for ln in out if ln.startswith("fit over"))
    assert fit.startswith("fit over 2 shapes: us = 2.00 + 0.500 * MB"), fit
    assert "2000 GB/s" in fit
    shapes = out[out.index(next(ln for ln in out if ln.startswith("launch shapes"))) + 1:-1]
    assert [ln.split()[:3] for ln in shapes] == [["2", "3.00", "2.00"], ["1", "5.00", "6.00"]]


def test_gemv_stall_summary_per_variant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """scripts/bench/ncu_gemv.py --summarize: 3 launches per variant, in launch order; the
    stall reasons sorted by warp-cycles per issue, their sum as cycles/issue."""
    mod = load_bench("ncu_gemv")
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    lines = [HEADER]
    for i in range(6):
        lines += [_row(i, "_gemv_planes_kernel", "gpu__time_duration.sum", "nsecond",
                       "4,000" if i < 3 else "5,500"),
                  _row(i, "_gemv_planes_kernel", stall.format("long_scoreboard"), "", "10.0"),
                  _row(i, "_gemv_planes_kernel", stall.format("wait"), "", "2.5" if i < 3 else "20.0")]
    p = tmp_path / "ncu.csv"
    p.write_text("\n".join(lines) + "\n")
    mod.summarize(str(p), ["auto", "x_prefetch"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6
    assert out[0].split()[:4] == ["auto", "#0", "4.00", "us"]
    assert out[0].endswith("cycles/issue   12.5: long_scoreboard 10.0, wait 2.5")
    assert out[5].split()[:4] == ["x_prefetch", "#2", "5.50", "us"]
    assert out[5].endswith("cycles/issue   30.0: wait 20.0, long_scoreboard 10.0")
