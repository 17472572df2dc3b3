"""Each kernel of a batch-1 decode step on its own (Nsight Compute), against the step's time.

Under ncu every kernel runs alone (serialized, no PDL overlap, no launch gap), so the sum of
their durations over a step is what the step would take with free launches; the difference to
the step's measured time (bench_engine's roofline row, measured without ncu: the "warm
step" this script prints first runs under ncu's launch interception and is many times
slower) is what launch gaps, PDL waits and serialization cost. `--summarize` also fits the
GEMV-like kernels' launch shapes to us = fixed + MB / rate. Run:

    ncu --profile-from-start off --graph-profiling node --clock-control none \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,\\
launch__registers_per_thread --csv --log-file $OUT/ncu_decode.csv \\
        python3 scripts/bench/ncu_decode.py [--shape qwen3-1.7b] [--format int4] [--steps 3]
    python3 scripts/bench/ncu_decode.py --summarize $OUT/ncu_decode.csv --steps 3

The second command groups the kernels by name: launches per step, mean us, DRAM bytes.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def profile(args: argparse.Namespace) -> None:
    import torch
    from bench_engine import orbit_model, prompts

    from orbit.quant.convert import convert_linears
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    model = orbit_model(args.shape, torch.bfloat16, "cuda")
    convert_linears(model, args.format)
    engine = Engine(model, max_num_seqs=1, max_model_len=args.prompt_len + 160, device="cuda",
                    attn_backend="triton", chain_mlp=args.chain_mlp == "on")
    ps = prompts(1, args.prompt_len, model.config.vocab_size)
    sp = SamplingParams(temperature=1.0, max_new_tokens=128, ignore_eos=True, seed=0)
    engine.generate(ps, sp)  # graph capture and compiles
    engine.generate(ps, sp)
    st = engine.last_stats
    print(f"warm step: {1e6 * st['decode_seconds'] / max(st['decode_steps'], 1):.1f} us per "
          f"decode step ({st['decode_tokens_per_s']:.1f} tok/s)", flush=True)
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.steps + 1, ignore_eos=True, seed=0)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    engine.generate(ps, sp)  # one prefill, then args.steps decode steps
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def number(v: str) -> float:
    return float(v.replace(",", "")) if v not in ("", "n/a") else 0.0


def launches(path: str) -> list[dict[str, str]]:
    """One dict per profiled launch of an `ncu --csv` log, in launch order: "name" and, per
    metric, its value under the metric's name and its unit under the name + " unit"."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu --csv table (no line starting with \"ID\")")
    per: dict[int, dict[str, str]] = defaultdict(dict)
    for r in csv.DictReader(lines[start:]):
        k = per[int(r["ID"])]
        k["name"] = r["Kernel Name"]
        k[r["Metric Name"]] = r["Metric Value"]
        k[r["Metric Name"] + " unit"] = r["Metric Unit"]
    return [per[i] for i in sorted(per)]


def duration_us(k: dict[str, str]) -> float:
    """A `launches` entry's gpu__time_duration.sum in microseconds, from any of ncu's units
    (nanoseconds when it names none)."""
    ns = number(k.get("gpu__time_duration.sum", "0"))
    return ns * {"usecond": 1e3, "msecond": 1e6}.get(k.get("gpu__time_duration.sum unit"), 1) / 1e3


def _kernels(path: str) -> list[dict]:
    """One dict per profiled launch: name, grid, us, bytes (DRAM read), regs."""
    out = []
    for k in launches(path):
        b = number(k.get("dram__bytes_read.sum", "0"))
        b *= {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(k.get("dram__bytes_read.sum unit"), 1)
        out.append({"name": k["name"][:80], "grid": number(k.get("launch__grid_size", "0")),
                    "us": duration_us(k), "bytes": b,
                    "regs": number(k.get("launch__registers_per_thread", "0"))})
    return out


def summarize(path: str, steps: int, fit: str = "gemv|chain|qgemm") -> None:
    """Per kernel name over the profiled range (the prefill's kernels included: they are
    flagged by launches per step that are not whole); then the kernels whose name matches
    `fit` per launch shape (grid, MB) and a least-squares line us = fixed + MB / rate over
    those shapes (each weighted by its launches): the fixed cost a launch pays whatever its
    bytes, and the rate it streams at once started."""
    ks = _kernels(path)
    by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for k in ks:
        row = by[k["name"]]
        row[0] += 1
        row[1] += k["us"]
        row[2] += k["bytes"]
        row[3], row[4] = k["grid"], k["regs"]
    total = sum(k["us"] for k in ks)
    print(f"{len(ks)} kernels, {total:.1f} us in all = {total / steps:.1f} us per step "
          f"(prefill included)")
    print(f"{'per step':>8} {'mean us':>8} {'us/step':>8} {'MB/launch':>9} {'GB/s':>7} "
          f"{'grid':>6} {'regs':>4}  kernel")
    for name, (c, us, b, grid, regs) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{c / steps:8.2f} {us / c:8.2f} {us / steps:8.1f} {b / c / 1e6:9.2f} "
              f"{b / max(us, 1e-9) / 1e3:7.0f} {grid:6.0f} {regs:4.0f}  {name}")
    shapes: dict[tuple, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for k in ks:
        if re.search(fit, k["name"]):
            sh = shapes[(k["name"], k["grid"], round(k["bytes"] / 1e5) / 10)]
            sh[0] += 1
            sh[1] += k["us"]
            sh[2] += k["bytes"]
    if not shapes:
        return
    print(f"\nlaunch shapes of /{fit}/: launches, mean us, MB, GB/s, grid, kernel")
    for (name, grid, _), (c, us, b) in sorted(shapes.items(), key=lambda kv: kv[0][2]):
        print(f"{c:6d} {us / c:8.2f} {b / c / 1e6:7.2f} {b / max(us, 1e-9) / 1e3:7.0f} "
              f"{grid:6.0f}  {name}")
    pts = [(b / c / 1e6, us / c, c) for c, us, b in shapes.values()]
    w = sum(c for _, _, c in pts)
    mx = sum(x * c for x, _, c in pts) / w
    my = sum(y * c for _, y, c in pts) / w
    sxx = sum(c * (x - mx) ** 2 for x, _, c in pts)
    if sxx <= 0:
        return
    slope = sum(c * (x - mx) * (y - my) for x, y, c in pts) / sxx  # us per MB
    print(f"fit over {len(pts)} shapes: us = {my - slope * mx:.2f} + {slope:.3f} * MB "
          f"(fixed {my - slope * mx:.2f} us per launch; {1e3 / slope if slope > 0 else 0:.0f} "
          f"GB/s once streaming)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen3-1.7b")
    ap.add_argument("--format", default="int4")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chain-mlp", default="off", choices=("on", "off"),
                    help="the persistent MLP launch (off by default here: a kernel whose "
                         "programs spin on each other, under ncu's serialized replay)")
    ap.add_argument("--summarize", default="", help="an ncu --csv log to summarize instead")
    ap.add_argument("--fit", default="gemv|chain|qgemm",
                    help="with --summarize: kernel names (regex) for the per-shape table and "
                         "the fixed-cost fit")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.steps, args.fit)
    else:
        profile(args)


if __name__ == "__main__":
    main()
