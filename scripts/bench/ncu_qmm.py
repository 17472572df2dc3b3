"""Driver for Nsight Compute on the fast-mode quantized matmul (one format, shape and M;
three launches of whatever `dispatch.qmm` routes there, or of one forced tile).

    ncu --clock-control none --kernel-name regex:_qgemm --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python3 scripts/bench/ncu_qmm.py --fmt nvfp4 --shape 4096x12288 --m 4 [--regfed]

--regfed forces `_qgemm.regfed_config`'s register-fed tile (the NVFP4 rule's); without it the
route is the process's own (route table or rules). The third launch is warm (compiled, L2
holding whatever the second left: ncu flushes caches between profiled kernels by default)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qmm import _fused

from orbit.kernels import _qgemm
from orbit.kernels.dispatch import qmm
from orbit.kernels.gemv import num_sms
from orbit.kernels.random_weights import random_qweight


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x12288", help="in x out")
    ap.add_argument("--fmt", default="nvfp4", choices=("int4", "nvfp4", "mxfp4", "fp8"))
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--regfed", action="store_true", help="force _qgemm.regfed_config's tile")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    qw = random_qweight(args.fmt, n, k, device="cuda")
    x = torch.randn(args.m, k, device="cuda").bfloat16()
    if args.regfed:
        cfg = _qgemm.regfed_config(args.m, n, k, num_sms(x.device))
        print("tile", cfg)
        for _ in range(3):
            _fused(x, qw, config=cfg)
    else:
        for _ in range(3):
            qmm(x, qw)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
