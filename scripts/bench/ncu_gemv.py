"""Driver for Nsight Compute on the plane GEMV (one shape, a few configs, 3 launches each).

    ncu --clock-control none --kernel-name regex:_gemv_planes --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats \
        python3 scripts/bench/ncu_gemv.py [--shape 4096x12288] [--fmt int4] [--m 1] \
        [--variants auto,l2_prefetch]

Launch i of config c is number 3c + i, so skip 2 / count 2 profiles the third launch of the
first config (warm) and the first of the second (with --launch-skip-before-match 0 and count
3 per variant, every launch). Variants: `auto` is the shipped heuristic's config; any other
name is a boolean GemvConfig field (x_prefetch, defer, pdl, ...) set to True on it,
so that the stall reasons of two K-loop forms can be read side by side:

    bash scripts/bench/ncu_gemv_stalls.sh 2048x4096 auto,l2_prefetch   # (--summarize its CSV)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.kernels.gemv import GemvConfig, gemv, num_sms, pick_gemv_config
from orbit.kernels.random_weights import gemv_operands, random_qweight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ncu_decode import duration_us, launches, number

STALL = "smsp__average_warps_issue_stalled_"


def variant(auto: GemvConfig, name: str) -> GemvConfig:
    """The auto config, or it with the boolean field `name` switched on."""
    if name == "auto":
        return auto
    fields = {f.name: f for f in dataclasses.fields(GemvConfig)}
    if name not in fields or fields[name].type not in ("bool", bool):
        raise SystemExit(f"--variants: {name!r} is not a boolean GemvConfig field "
                         f"({', '.join(n for n, f in fields.items() if f.type in ('bool', bool))})")
    return dataclasses.replace(auto, **{name: True})


def summarize(path: str, variants: list[str], top: int = 6) -> None:
    """Per profiled launch (3 per variant, in order): us, DRAM % of peak, registers,
    instructions, and the `top` stall reasons in warp-cycles per issued instruction (the
    WarpStateStats metric: how long, on average, a warp waited on each reason between two
    of its instructions)."""
    ks = launches(path)
    for i, k in enumerate(ks):
        name = variants[i // 3] if i // 3 < len(variants) else "?"
        us = duration_us(k)
        stalls = sorted(((number(v), m[len(STALL):].split("_per_issue")[0]) for m, v in k.items()
                         if m.startswith(STALL) and not m.endswith(" unit")), reverse=True)
        total = sum(v for v, _ in stalls)
        print(f"{name:>12} #{i % 3} {us:7.2f} us  dram {number(k.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', '0')):5.1f}%"
              f"  regs {number(k.get('launch__registers_per_thread', '0')):4.0f}"
              f"  inst {number(k.get('smsp__inst_executed.sum', '0')):9.0f}"
              f"  cycles/issue {total:6.1f}: "
              + ", ".join(f"{r} {v:.1f}" for v, r in stalls[:top]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="CSV", help="print the ncu --csv log's launches")
    ap.add_argument("--shape", default="4096x12288", help="in x out")
    ap.add_argument("--fmt", default="int4", choices=("int4", "nvfp4"))
    ap.add_argument("--m", type=int, default=1, help="activation rows")
    ap.add_argument("--variants", default="auto,l2_prefetch", help="comma list, see above")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.variants.split(","))
        return 0
    k, n = (int(v) for v in args.shape.split("x"))
    ops = gemv_operands(random_qweight(args.fmt, n, k, device="cuda"))
    x = torch.randn(args.m, k, device="cuda").bfloat16()
    y = torch.empty(args.m, n, device="cuda", dtype=torch.bfloat16)
    auto = pick_gemv_config(args.m, n, k, args.fmt, num_sms(x.device))
    for name in args.variants.split(","):
        cfg = variant(auto, name)
        for _ in range(3):
            gemv(x, *ops, y, cfg)
        torch.cuda.synchronize()
        print(name, cfg, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
