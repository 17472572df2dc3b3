"""INT4 and NVFP4 at rollout batch sizes (17-256 rows) on Hopper: the wgmma kernel
(orbit/kernels/int4_wgmma.py) against what fast mode runs there today and cuBLAS BF16.

Per Qwen3-1.7B linear shape (the stacked q/k/v and gate/up weights the engine's sibling groups
run, o, down) and M, each timed over weight copies spanning 3x L2 and replayed as one CUDA graph
(the route tuner's timer): cuBLAS BF16 `x @ W.T` (the baseline, same run), fast mode's route
(`qmm`: the shipped route table or the rules: the `tl.dot` loop or dequantize + cuBLAS), forced
dequantize + cuBLAS, the wgmma kernel's picked config and a neighbourhood of configs (split /
2 and x 2, two warpgroups, ring depth 3). Roofline per row: the INT4 codes + scales + x + y
bytes over the measured copy bandwidth, and the MMA FLOPs over the BF16 dense rate.

    python3 scripts/bench/bench_wgmma.py [--formats int4,nvfp4] [--shapes 2048x4096,...]
        [--m 32,64,...] [--no-sweep] [--out DIR]
JSON rows on stdout (and DIR/bench_wgmma.json), then a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qmm import _with_dequant_min_m, copies_for, copy_gbs, ms_rotated  # noqa: E402

from orbit.kernels import int4_wgmma  # noqa: E402
from orbit.kernels.dispatch import qmm  # noqa: E402
from orbit.kernels.gemv import num_sms  # noqa: E402
from orbit.kernels.int4_mma import weight_operands  # noqa: E402
from orbit.kernels.random_weights import random_qweight  # noqa: E402

SHAPES = "2048x4096,2048x2048,2048x12288,6144x2048"  # in x out
MS = "32,64,96,128,256"


def neighbours(cfg: int4_wgmma.WgmmaConfig, m: int, k: int, n: int, group: int,
               sms: int) -> list[int4_wgmma.WgmmaConfig]:
    """The pick and its neighbourhood that the kernel runs at this K: 1 / 2 / 4 warpgroups,
    each with the split that fills the GPU (the pick's rule, slices down to 256 deep) and half
    / twice it; the pick with a 3-deep ring and with the other column tile."""
    out = [cfg]
    for wg in int4_wgmma.WARPGROUPS:
        tiles = -(-n // (64 * wg)) * -(-m // cfg.np_)
        fill = int4_wgmma.fill_split(tiles, k, group, sms, min_slice=256)
        for split in (fill // 2, fill, fill * 2):
            if split >= 1 and int4_wgmma.split_fits(k, split, group, min_slice=256):
                out.append(dataclasses.replace(cfg, warpgroups=wg, split=split))
    out.append(dataclasses.replace(cfg, stages=3))
    if 32 < m <= 64:
        out.append(dataclasses.replace(cfg, np_=128))
    if m > 64:
        out.append(dataclasses.replace(cfg, np_=64))
    return list(dict.fromkeys(out))  # (the pick first, each config once)


def measure(rows: list[dict], fmt: str, k: int, n: int, m: int, wbs: list, qws: list,
            bw: float, sms: int, sweep: bool) -> None:
    """The rows of one shape and M: cuBLAS BF16, fast mode's route, dequantize + cuBLAS, the
    wgmma pick (and its neighbourhood with `sweep`)."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    wbytes = qws[0].nbytes() + 2 * m * (n + k)

    def row(path: str, ms: float, cfg: str = "") -> None:
        r = {"fmt": fmt, "k": k, "n": n, "m": m, "path": path, "cfg": cfg, "us": ms * 1e3,
             "frac_copy_bw": wbytes / ms / 1e6 / bw, "TFLOPs": 2 * m * n * k / ms / 1e9}
        rows.append(r)
        print(json.dumps(r), flush=True)

    row("cublas-bf16", ms_rotated([lambda w=w: x @ w.T for w in wbs]))
    row("route", ms_rotated([lambda q=q: qmm(x, q) for q in qws]))
    row("dequant+cublas", _with_dequant_min_m(1, ms_rotated,
                                              [lambda q=q: qmm(x, q) for q in qws]))
    ops = [weight_operands(q) for q in qws]  # (codes, scales, group, global scale)
    group = ops[0][2]
    pick = int4_wgmma.pick_config(m, k, n, group, sms)
    for cfg in neighbours(pick, m, k, n, group, sms) if sweep else [pick]:
        calls = [lambda o=o, c=cfg: int4_wgmma.int4_wgmma(x, *o[:3], c, None, fmt, o[3])
                 for o in ops]
        try:
            row("wgmma-pick" if cfg == pick else "wgmma", ms_rotated(calls),
                str(dataclasses.astuple(cfg)))
        except Exception as e:  # a config the device refuses: recorded, not fatal
            print(json.dumps({"fmt": fmt, "k": k, "n": n, "m": m, "cfg": str(cfg),
                              "error": f"{type(e).__name__}: {str(e)[:300]}"}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="int4,nvfp4")
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--m", default=MS)
    ap.add_argument("--no-sweep", action="store_true", help="the pick only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    dev = torch.device("cuda")
    bw = copy_gbs()
    sms = num_sms(dev)
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": bw, "sms": sms}))
    rows = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        wbs = [torch.randn(n, k, device=dev).bfloat16() * 0.05
               for _ in range(copies_for(2 * n * k))]
        for fmt in args.formats.split(","):
            kw = {"group_size": 128} if fmt == "int4" else {}
            qw0 = random_qweight(fmt, n, k, device=dev, **kw)
            qws = [random_qweight(fmt, n, k, seed=i, device=dev, **kw)
                   for i in range(copies_for(qw0.nbytes()))]
            for m in (int(v) for v in args.m.split(",")):
                measure(rows, fmt, k, n, m, wbs, qws, bw, sms, not args.no_sweep)
            del qws
        del wbs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_wgmma.json").write_text(json.dumps(rows, indent=1))
    print(f"{'fmt':>5} {'k':>5} {'n':>6} {'m':>4} {'cublas':>8} {'route':>8} {'deq':>8} {'pick':>8} "
          f"{'best':>8} {'best/cublas':>11}  best cfg (np, wg, split, stages, pdl)")
    key = {}
    for r in rows:
        key.setdefault((r["fmt"], r["k"], r["n"], r["m"]), []).append(r)
    for (fmt, k, n, m), rs in key.items():
        by = {r["path"]: r["us"] for r in rs if r["path"] != "wgmma"}
        wg = [r for r in rs if r["path"].startswith("wgmma")]
        best = min(wg, key=lambda r: r["us"]) if wg else None
        print(f"{fmt:>5} {k:>5} {n:>6} {m:>4} {by.get('cublas-bf16', 0):8.2f} {by.get('route', 0):8.2f} "
              f"{by.get('dequant+cublas', 0):8.2f} {by.get('wgmma-pick', 0):8.2f} "
              f"{best['us'] if best else 0:8.2f} "
              f"{by.get('cublas-bf16', 0) / best['us'] if best else 0:11.2f}  "
              f"{best['cfg'] if best else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
