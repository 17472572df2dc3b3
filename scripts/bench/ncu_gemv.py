"""Driver for Nsight Compute on the plane GEMV (one shape, a few configs, 3 launches each).

    ncu --clock-control none --kernel-name regex:_gemv_planes --launch-skip 2 \
        --launch-count 2 --section SpeedOfLight --section WarpStateStats \
        python3 scripts/bench/ncu_gemv.py [--shape 4096x12288] [--fmt int4]

Launch i of config c is number 3c + i, so skip 2 / count 2 profiles the third launch of the
first config (warm) and the first of the second. Configs: the shipped heuristic's, then the
same with the x prefetch (GemvConfig.x_prefetch)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.kernels.gemv import gemv, num_sms, pick_gemv_config  # noqa: E402
from orbit.kernels.random_weights import random_qweight  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x12288", help="in x out")
    ap.add_argument("--fmt", default="int4", choices=("int4", "nvfp4"))
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    qw = random_qweight(args.fmt, n, k, device="cuda")
    t = qw.tensors
    q = t["qweight"] if args.fmt == "int4" else t["weight"]
    gs = t["global_scale"].reshape(1) if args.fmt == "nvfp4" else None
    group = 128 if args.fmt == "int4" else 16
    x = torch.randn(1, k, device="cuda").bfloat16()
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    auto = pick_gemv_config(1, n, k, args.fmt, num_sms(x.device))
    for cfg in (auto, dataclasses.replace(auto, x_prefetch=True)):
        for _ in range(3):
            gemv(x, args.fmt, qw.shape, q, t["scale"], None, gs, group, y, cfg)
        print(cfg, flush=True)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
