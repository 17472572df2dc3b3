"""Benchmark the fused LoRA decode kernels (orbit/kernels/lora_decode.py) against the plain
LoRA forward (four torch launches per member: x A^T, h B^T, the scale, the add) on the
Qwen3-1.7B groups (r 16): q/k/v, o, gate/up, down, at M = 1, 4, 16 and 64 rows.

Each variant's calls run on adapter copies spanning 3x L2 and are replayed as one CUDA graph
(bench_qmm.ms_rotated), as the engine's decode step replays them; "fused+pdl" launches them
inside `pdl_scope(True)`. Roofline per call: bytes (A, B, x, y read and written) / copy
bandwidth measured in the same run; at these sizes (0.1-0.4 MB) a call is latency-bound, so
the floor that matters is a kernel's fixed cost, not the bytes.

`--base int4` (or nvfp4, fp8, ...) times the group with its quantized base launch instead, the
way the engine runs it: "base" (the base launch alone: the adapter's floor), "base+2" (the
base launch, then the shrink and expand-add launches) and "fold" (the base launch with h
computed in its grid and the delta added in its store: orbit/kernels/lora_epilogue.py), all
with PDL, where the fold takes the shape (M = 1 for the stacked groups; every M for o/down).

    python scripts/bench/bench_lora_decode.py [--m 1,4,16,64] [--base FMT] [--out DIR]
"""

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
from bench_qmm import copies_for, copy_gbs, ms_rotated

from orbit.kernels.lora_decode import lora_decode_reference, lora_decode_triton
from orbit.kernels.pdl import pdl_scope

R = 16
GROUPS = {"qkv": (2048, [2048, 1024, 1024]), "o": (2048, [2048]),
          "gate_up": (2048, [6144, 6144]), "down": (6144, [2048])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,4,16,64")
    ap.add_argument("--base", default="", help="time with this quantized base (int4, ...)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    if args.base:
        return with_base(args.base, [int(v) for v in args.m.split(",")], args.out)
    bw = copy_gbs()
    meta = {"device": torch.cuda.get_device_name(), "copy_GBps": bw, "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(json.dumps(meta), flush=True)
    rows = []
    for m in [int(v) for v in args.m.split(",")]:
        for name, (k, ns) in GROUPS.items():
            nbytes = 2 * (len(ns) * R * k + sum(ns) * R + m * k + 2 * m * sum(ns))
            copies = copies_for(nbytes)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ad = [([torch.randn(R, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in ns],
                   [torch.randn(n, R, device="cuda", dtype=torch.bfloat16) * 0.02 for n in ns],
                   list(torch.split(torch.randn(m, sum(ns), device="cuda", dtype=torch.bfloat16),
                                    ns, dim=1)))
                  for _ in range(copies)]

            def plain(a, b, y, x=x):
                return lambda: lora_decode_reference(x, a, b, y, 2.0)

            def fused(a, b, y, x=x):
                return lambda: lora_decode_triton(x, a, b, y, 2.0)

            t_plain = ms_rotated([plain(*c) for c in ad]) * 1e3
            t_fused = ms_rotated([fused(*c) for c in ad]) * 1e3
            with pdl_scope(True):
                t_pdl = ms_rotated([fused(*c) for c in ad]) * 1e3
            floor = nbytes / bw / 1e3
            row = {"m": m, "group": name, "k": k, "ns": ns, "bytes": nbytes, "plain_us": t_plain,
                   "fused_us": t_fused, "fused_pdl_us": t_pdl, "roofline_us": floor,
                   "launches_plain": 4 * len(ns), "launches_fused": 2}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del ad
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_lora_decode.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n# bench_lora_decode on {meta['device']} (copy {bw:.0f} GB/s), r {R}, us per call")
    for r in rows:
        print(f"M={r['m']:<3} {r['group']:<8} plain ({r['launches_plain']:>2} launches) "
              f"{r['plain_us']:7.2f}  fused {r['fused_us']:6.2f}  fused+pdl {r['fused_pdl_us']:6.2f}"
              f"  bytes {r['bytes'] / 1e3:6.0f} KB = {r['roofline_us']:.2f} us at copy bandwidth")
    return 0


def with_base(fmt: str, ms: list[int], out: str | None) -> int:
    """The `--base` comparison (module doc): us per group call, rotated and graph-replayed."""
    from orbit.kernels import dispatch
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.random_weights import random_qweight

    bw = copy_gbs()
    meta = {"device": torch.cuda.get_device_name(), "copy_GBps": bw, "base": fmt,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(json.dumps(meta), flush=True)
    kw = {"group_size": 128} if fmt == "int4" else {}
    rows = []
    for m in ms:
        for name, (k, ns) in GROUPS.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            q0 = random_qweight(fmt, sum(ns), k, device="cuda", **kw)
            copies = copies_for(q0.nbytes())
            groups = [(random_qweight(fmt, sum(ns), k, seed=i, device="cuda", **kw),
                       [torch.randn(R, k, device="cuda", dtype=torch.bfloat16) * 0.02
                        for _ in ns],
                       [torch.randn(n, R, device="cuda", dtype=torch.bfloat16) * 0.02
                        for n in ns]) for i in range(copies)]
            fold = dispatch.lora_foldable(x, q0, len(ns))

            def base(qw, a, b, x=x):
                return lambda: dispatch.qmm(x, qw)

            def base2(qw, a, b, x=x, ns=ns):
                return lambda: lora_decode_triton(x, a, b, list(torch.split(
                    dispatch.qmm(x, qw), ns, dim=1)), 2.0)

            def folded(qw, a, b, x=x):
                h = torch.empty(x.shape[0], len(a) * R, device="cuda", dtype=torch.bfloat16)
                return lambda: dispatch.qmm_lora(x, qw, LoRAEpilogue(h, tuple(b), 2.0, tuple(a)))

            row = {"m": m, "group": name, "k": k, "ns": ns, "base": fmt}
            with pdl_scope(True):
                row["base_us"] = ms_rotated([base(*g) for g in groups]) * 1e3
                row["base2_us"] = ms_rotated([base2(*g) for g in groups]) * 1e3
                row["fold_us"] = ms_rotated([folded(*g) for g in groups]) * 1e3 if fold else None
            rows.append(row)
            print(json.dumps(row), flush=True)
            del groups
            torch.cuda.empty_cache()
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_lora_decode_base.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\n# bench_lora_decode --base {fmt} on {meta['device']}, r {R}, us per group call "
          "(with PDL)")
    for r in rows:
        f = f"{r['fold_us']:6.2f}" if r["fold_us"] is not None else "   n/a"
        print(f"M={r['m']:<3} {r['group']:<8} base {r['base_us']:6.2f}  base+shrink+expand "
              f"{r['base2_us']:6.2f}  fold {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
