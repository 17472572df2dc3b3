"""Benchmark the persistent MLP launch (orbit/kernels/gemv_chain.py) against the two separate
decode GEMVs it replaces (gate/up + SwiGLU, then down), at decode rows, in one run.

Each variant runs back to back over MLP weight copies that together span 3x the L2 (so every
call reads its weights from DRAM), captured as one CUDA graph and replayed (launch overhead
out, as in the engine's graphed decode step), inside `pdl_scope(True)` as the engine runs its
decode steps (the `-nopdl` rows without). Reported per MLP: microseconds, the bytes of both
weights (codes + scales), the roofline (bytes / the copy bandwidth measured in the same run)
and the achieved fraction of it.

Variants: `separate` (gemv(swiglu=True) + gemv, the engine's path without the chain;
`-wpre1` / `-wpre2`: GemvConfig.w_preload steps, `r`: with pdl.EARLY_RELEASE), `chain`
with prefetch 0 / 1 / 2 (ChainConfig.prefetch; the grid barrier), `chain-2launch-pf0` (the
chain's kernel as two launches: its code without the barrier), `flow` (ChainConfig.dataflow:
per-K-slice readiness counters instead of the barrier; `-grid`: work items in the separate
launches' order; `flow-wpre`, `-wpre2`, `-wpre1d1`: the shipped form with
ChainConfig.w_preload = 1 or 2 gate/up steps, or 1 and preload_down = 1).

    python scripts/bench/bench_chain.py [--formats int4,nvfp4,mxfp4] [--shapes 2048x6144,...]
        [--m 1] [--out FILE]
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
from orbit.kernels.gemv_chain import ChainConfig, chain_residency, mlp_chain
from orbit.kernels.grid_barrier import barrier_timed_out
from orbit.kernels.pdl import pdl_scope
from orbit.kernels.qmm_tune import graph_timer, l2_copies, weight_maker

SHAPES = [(2048, 6144), (2560, 9728), (576, 1536)]  # (hidden, intermediate): Qwen3-1.7B/4B, SmolLM2


def engine_mlp(x: torch.Tensor, gu, dn) -> torch.Tensor:
    """The engine's MLP without the chain: the gate/up GEMV storing SwiGLU, then down."""
    from orbit.kernels.dispatch import qmm, qmm_swiglu

    return qmm(qmm_swiglu(x, gu), dn)


def with_w_preload(steps: int, release: bool, fn):
    """fn with gemv.PDL_W_PRELOAD = steps and pdl.EARLY_RELEASE = release while it runs (read
    when a call picks its config and launch arguments, i.e. when the timer's graph is
    captured)."""
    from orbit.kernels import gemv, pdl

    def run(*args):
        old = gemv.PDL_W_PRELOAD, pdl.EARLY_RELEASE
        gemv.PDL_W_PRELOAD, pdl.EARLY_RELEASE = steps, release
        try:
            return fn(*args)
        finally:
            gemv.PDL_W_PRELOAD, pdl.EARLY_RELEASE = old
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int4,nvfp4,mxfp4")
    ap.add_argument("--shapes", default=",".join(f"{h}x{i}" for h, i in SHAPES))
    ap.add_argument("--m", default="1")
    ap.add_argument("--variants", default="",
                    help="comma list of variant names to run (default: all)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_chain.json"))
    args = ap.parse_args()
    from bench_qmm import copy_gbs

    dev = torch.device("cuda")
    copy = copy_gbs()
    copies = l2_copies(dev)
    timer = graph_timer()
    rows = []
    print(f"{torch.cuda.get_device_name()}  copy {copy:.0f} GB/s")
    for fmt in args.formats.split(","):
        for shape in args.shapes.split(","):
            hid, inter = (int(v) for v in shape.split("x"))
            make = weight_maker(dev, 128 if hid % 128 == 0 and inter % 128 == 0 else 64)
            first = make(fmt, 2 * inter, hid, 0), make(fmt, hid, inter, 1)
            nbytes = first[0].nbytes() + first[1].nbytes()
            ws = [first] + [(make(fmt, 2 * inter, hid, 2 * i), make(fmt, hid, inter, 2 * i + 1))
                            for i in range(1, copies(nbytes))]
            roof_us = nbytes / (copy * 1e9) * 1e6
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, hid, device=dev, dtype=torch.bfloat16)
                variants = {
                    "separate": lambda gu, dn: engine_mlp(x, gu, dn),
                    **{f"separate-wpre{n}{'r' if r else ''}": with_w_preload(
                        n, r, lambda gu, dn: engine_mlp(x, gu, dn))
                       for n, r in ((1, False), (2, False), (1, True), (2, True))},
                    "chain-pf0": lambda gu, dn: mlp_chain(x, gu, dn, ChainConfig(prefetch=0)),
                    "chain-pf1": lambda gu, dn: mlp_chain(x, gu, dn, ChainConfig(prefetch=1)),
                    "chain-pf2": lambda gu, dn: mlp_chain(x, gu, dn, ChainConfig(prefetch=2)),
                    "chain-2launch-pf0": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(fused=False, prefetch=0)),
                    "flow-pf0": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(prefetch=0, dataflow=True)),
                    "flow-pf0-grid": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(prefetch=0, dataflow=True, grid_order=True)),
                    "flow-wpre": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(w_preload=1)),
                    "flow-wpre2": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(w_preload=2)),
                    "flow-wpre1d1": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(w_preload=1, preload_down=1)),
                    "flow-pf1-grid": lambda gu, dn: mlp_chain(
                        x, gu, dn, ChainConfig(prefetch=1, dataflow=True, grid_order=True)),
                }
                if args.variants:
                    variants = {k: v for k, v in variants.items()
                                if k in args.variants.split(",")}
                want = engine_mlp(x, *first)
                for name, fn in variants.items():
                    for pdl in (True, False) if name in ("separate", "flow-pf0-grid") else (True,):
                        try:
                            same = torch.equal(fn(*first), want)
                            with pdl_scope(pdl):
                                t = timer([lambda gu=gu, dn=dn: fn(gu, dn) for gu, dn in ws])
                            ok = not barrier_timed_out(dev)
                        except Exception as e:  # noqa: BLE001  (a row says why, the run goes on)
                            print(f"{fmt} {shape} m={m} {name}: {type(e).__name__}: {e}")
                            continue
                        us = t * 1e6
                        row = {"fmt": fmt, "hidden": hid, "inter": inter, "m": m,
                               "variant": name + ("" if pdl else "-nopdl"), "us": round(us, 2),
                               "bytes": nbytes, "roofline_us": round(roof_us, 2),
                               "of_roofline": round(roof_us / us, 3), "same_bits": same,
                               "barrier_ok": ok}
                        rows.append(row)
                        print(f"{fmt:6s} {hid}x{inter} m={m} {row['variant']:16s} {us:7.2f} us"
                              f"  roofline {roof_us:5.2f} us ({100 * roof_us / us:4.1f}%)"
                              f"  same bits {same}  barrier ok {ok}", flush=True)
    for r in chain_residency():
        print(f"persistent variant: {r}")
    out = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
           "copy_gbs": copy, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
