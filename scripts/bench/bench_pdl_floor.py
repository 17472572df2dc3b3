"""The floor under a batch-1 decode kernel: a chain of PDL launches that only stream bytes.

Each launch of `_stream_kernel` waits on the one before (`pdl_enter`, then a load of the
value the previous launch stored for this program: a true dependency, as between two decode
GEMVs), then reads its own slice of a weight copy (int32 words, no arithmetic beyond an xor)
and stores one word per program. Chains of such launches over weight copies spanning 3x the
L2 (every launch reads DRAM) are captured as one CUDA graph and replayed, as bench_chain and
bench_qmm time the decode kernels. Per (bytes, grid, PDL) the row gives microseconds per
launch, and the fixed part: the time minus bytes / the copy bandwidth measured in the same
run. A GEMV of the same bytes and grid cannot beat this row; the difference between the two
is what the GEMV's own work (x load, decode, reduction, split-K fix-up) costs, and the fixed
part x launches per step is what only fewer launches (a persistent layer kernel) removes.

    python scripts/bench/bench_pdl_floor.py [--mb 0,2.2,4.3,6.5,13] [--grids 132,264,528]
        [--pdl both] [--out FILE]
"""

# ruff: noqa: B023  (every closure below is timed inside the loop iteration that made it)
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from orbit.kernels._triton import tl, triton
from orbit.kernels.pdl import pdl_enter, pdl_launch, pdl_scope
from orbit.kernels.qmm_tune import graph_timer, l2_copies

BLOCK = 1024  # int32 words per step of a program (4 warps: 8 words = two 16-byte loads a lane)


@triton.jit
def _stream_kernel(w_ptr, chain_ptr, n_words, per_prog, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    pdl_enter(PDL)
    pid = tl.program_id(0)
    prev = tl.load(chain_ptr + pid)  # the previous launch's store: the dependency
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    lo = pid.to(tl.int64) * per_prog
    for i in tl.range(0, per_prog, BLOCK, num_stages=3):
        offs = lo + i + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=(offs < n_words) & (i + tl.arange(0, BLOCK) < per_prog),
                       other=0)
    tl.store(chain_ptr + pid, prev + (tl.xor_sum(acc, axis=0) & 1))


def _per_program(n: int, grid: int) -> int:
    """Words each of `grid` programs reads of n (whole BLOCK steps; the last slice short)."""
    return triton.cdiv(triton.cdiv(n, grid), BLOCK) * BLOCK if n else 0


def stream(w: torch.Tensor, chain: torch.Tensor, grid: int, pdl: bool) -> None:
    """One launch: `grid` programs read w's words in contiguous slices (none when w is empty)."""
    n = w.numel()
    _stream_kernel[(grid,)](w, chain, n, _per_program(n, grid), BLOCK=BLOCK, num_warps=4,
                            **(pdl_launch(w.device, grid, forced=True) if pdl else {"PDL": False}))


def reference(w: torch.Tensor, chain: torch.Tensor, grid: int) -> torch.Tensor:
    """What one launch leaves in `chain` (plain PyTorch), for the self-check."""
    n, per = w.numel(), _per_program(w.numel(), grid)
    out = chain.clone()
    for p in range(grid):
        x = 0
        for v in w[p * per:min((p + 1) * per, n)].tolist():
            x ^= v
        out[p] += x & 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", default="0,2.2,4.3,6.5,13", help="megabytes each launch reads")
    ap.add_argument("--grids", default="132,264,528", help="programs per launch")
    ap.add_argument("--pdl", default="both", choices=("on", "off", "both"))
    ap.add_argument("--launches", type=int, default=96, help="launches per timed graph (bytes 0)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_pdl_floor.json"))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    from bench_engine import copy_bandwidth_gbs

    copy = copy_bandwidth_gbs()
    head = {"device": torch.cuda.get_device_name(dev), "copy_GBps": copy, "torch": torch.__version__,
            "triton": triton.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat()}
    print(json.dumps(head))
    # self-check on a small case: the kernel reads what it is meant to
    w = (torch.arange(5000, dtype=torch.int32) * 40503) % 1021  # slices of either parity
    chain = torch.zeros(7, dtype=torch.int32)
    want = reference(w, chain, 7)
    got = chain.to(dev)
    stream(w.to(dev), got, 7, False)
    if not torch.equal(got.cpu(), want):
        raise SystemExit("bench_pdl_floor: the stream kernel disagrees with its reference")
    timer = graph_timer()
    copies = l2_copies(dev)
    rows = []
    pdls = {"on": [True], "off": [False], "both": [False, True]}[args.pdl]
    for mb in (float(v) for v in args.mb.split(",")):
        words = int(mb * 1e6) // 4
        n = copies(words * 4) if words else args.launches
        ws = [torch.randint(-2**31, 2**31 - 1, (words,), device=dev, dtype=torch.int32)
              for _ in range(n)]
        for grid in (int(v) for v in args.grids.split(",")):
            chain = torch.zeros(grid, device=dev, dtype=torch.int32)
            for pdl in pdls:
                calls = [lambda w_=w_: stream(w_, chain, grid, pdl) for w_ in ws]
                with pdl_scope(pdl):
                    s = timer(calls)
                us = s * 1e6
                floor_us = words * 4 / (copy * 1e9) * 1e6
                row = {**head, "mb": mb, "grid": grid, "pdl": pdl, "us": us,
                       "bytes_us": floor_us, "fixed_us": us - floor_us,
                       "GBps": words * 4 / s / 1e9 if words else 0.0}
                rows.append(row)
                print(f"{mb:6.1f} MB grid {grid:4d} pdl {'on ' if pdl else 'off'}: {us:6.2f} us "
                      f"per launch (bytes at copy bandwidth {floor_us:5.2f}, fixed "
                      f"{us - floor_us:5.2f}; {row['GBps']:6.0f} GB/s)")
        del ws
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
