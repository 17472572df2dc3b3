"""Driver for Nsight Compute on the INT4 mma.sync kernel (orbit/kernels/int4_mma.py): one
shape and M, a few configs, 3 launches each (the summary is ncu_gemv.summarize's).

    bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick,4:2:4:1,4:2:4:0 int4-mma 16

A config is `pick` (int4_mma.pick_config) or warps:row_tiles:split:prefetch[:x_prefetch].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.kernels.gemv import num_sms
from orbit.kernels.int4_mma import MmaConfig, int4_mma, pick_config
from orbit.kernels.random_weights import random_qweight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ncu_gemv import summarize


def parse_config(name: str, pick: MmaConfig) -> MmaConfig:
    """`pick`, or warps:row_tiles:split:prefetch[:x_prefetch]."""
    if name == "pick":
        return pick
    try:
        w, rt, sp, pf, *xp = (int(v) for v in name.split(":"))
    except ValueError:
        raise SystemExit(f"--configs: {name!r} is neither 'pick' nor "
                         "warps:row_tiles:split:prefetch[:x_prefetch]") from None
    return MmaConfig(w, rt, sp, pf, bool(xp and xp[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summarize", metavar="CSV", help="print the ncu --csv log's launches")
    ap.add_argument("--shape", default="4096x12288", help="in x out")
    ap.add_argument("--m", type=int, default=4, help="activation rows")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--configs", default="pick", help="comma list, see above")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.configs.split(","))
        return 0
    k, n = (int(v) for v in args.shape.split("x"))
    qw = random_qweight("int4", n, k, group_size=args.group, device="cuda")
    x = torch.randn(args.m, k, device="cuda").bfloat16()
    pick = pick_config(args.m, k, n, args.group, num_sms(x.device))
    for name in args.configs.split(","):
        cfg = parse_config(name, pick)
        for _ in range(3):
            int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], args.group, cfg)
        torch.cuda.synchronize()
        print(name, cfg, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
