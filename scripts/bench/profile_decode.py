"""Where a decode step's time goes in the native engine (GPU): one warm `Engine.generate`
under torch.profiler, then the per-op table (CUDA and CPU self time) and the wall time per
decode step. This is a diagnostic for issue 6's vs-transformers goal, not a benchmark row:
bench_engine.py gives the tokens/s that docs/benchmarks.md records.

    python scripts/bench/profile_decode.py [--shape smollm2-135m] [--batch 64] [--new 256]
        [--format int4] [--trace]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import SHAPES, orbit_model, prompts

from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--format", default="bf16", help="base precision (convert_linears), e.g. int4; bf16-ql: BF16 QuantLinears")
    ap.add_argument("--trace", action="store_true", help="also write $OUT/decode_trace.json")
    ap.add_argument("--attn-backend", default="auto", choices=("auto", "sdpa", "varlen", "triton"))
    ap.add_argument("--pdl", default="auto", choices=("auto", "on", "off"),
                    help="Engine(pdl=...); off gives each kernel's own duration (with PDL a "
                         "kernel's time includes its wait for the one before)")
    ap.add_argument("--timeline", action="store_true",
                    help="also print one steady decode step's kernels in launch order, "
                         "grouped by name: count, mean duration, mean gap before each")
    ap.add_argument("--chain-mlp", action="store_true",
                    help="Engine(chain_mlp=True): batch-1 MLPs as one persistent launch")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = orbit_model(args.shape, dtype, device)
    if args.format != "bf16":
        from orbit.quant.convert import convert_linears

        convert_linears(model, "bf16" if args.format == "bf16-ql" else args.format)
    pdl = None if args.pdl == "auto" else args.pdl == "on"
    engine = Engine(model, max_num_seqs=args.batch, max_model_len=args.prompt_len + args.new + 8,
                    device=device, attn_backend=args.attn_backend, pdl=pdl,
                    chain_mlp=args.chain_mlp)
    ps = prompts(args.batch, args.prompt_len, model.config.vocab_size)
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new, ignore_eos=True, seed=0)
    engine.generate(ps, sp)  # captures the graphs
    engine.generate(ps, sp)
    st = engine.last_stats
    print(f"warm: {st['tokens_per_s']:.0f} tok/s total, decode {st['decode_tokens_per_s']:.0f} tok/s, "
          f"{1e3 * st['decode_seconds'] / max(st['decode_steps'], 1):.3f} ms/decode step")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        engine.generate(ps, sp)
    st = engine.last_stats
    wall_ms = 1e3 * st["seconds"]
    if device == "cuda":
        # GPU busy time vs wall time: the gap is host work the GPU waits for (scheduling,
        # sampling bookkeeping, the per-step token read-back), not kernel time.
        # Only device-side events (kernels, copies): an eager op's own row repeats its kernels'
        # time as "self CUDA", so a sum over every row counts eager work twice.
        device_events = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA")]
        busy_us = sum(e.self_device_time_total for e in device_events)
        n_kernels = sum(e.count for e in device_events)
        steps = st["prefill_steps"] + st["decode_steps"]
        print(f"[{engine.attn_backend}] profiled generate: wall {wall_ms:.1f} ms, GPU busy "
              f"{busy_us / 1e3:.1f} ms ({100 * busy_us / 1e3 / wall_ms:.0f}%), {steps} steps, "
              f"{n_kernels / max(steps, 1):.0f} kernels/step, busy {busy_us / 1e3 / max(steps, 1):.3f} "
              f"ms/step, wall {wall_ms / max(steps, 1):.3f} ms/step")
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                    max_name_column_width=70))
    if device == "cuda" and args.timeline:
        print_timeline(prof)
    out = os.environ.get("OUT")
    if out and args.trace:
        prof.export_chrome_trace(os.path.join(out, "decode_trace.json"))


def step_windows(kernels: list, marker: str) -> list[list]:
    """Kernels (sorted by start) cut into decode steps: a step ends with a kernel whose name
    contains `marker` (the sampler's last kernel), the next begins after it."""
    steps, cur = [], []
    for k in kernels:
        cur.append(k)
        if marker in k.name:
            steps.append(cur)
            cur = []
    return steps


def print_timeline(prof: torch.profiler.profile) -> None:
    """The middle half of the decode steps, averaged: per kernel name (most time first),
    launches per step, mean duration and mean gap from the previous kernel's end (negative:
    it started before that one ended, as PDL allows). Also the step's span, the sum of kernel
    durations and the sum of positive gaps (GPU idle inside the step)."""
    ks = sorted((e for e in prof.events() if str(e.device_type).endswith("CUDA")
                 and e.time_range.end > e.time_range.start), key=lambda e: e.time_range.start)
    steps = step_windows(ks, "_pick_kernel")
    mid = steps[len(steps) // 4: max(len(steps) // 4 + 1, 3 * len(steps) // 4)]
    if not mid:
        print("timeline: no decode steps found (no _pick_kernel launches)")
        return
    order: dict[str, list[float]] = {}  # name -> [launches, duration us, gap us]
    spans, busy, idle = [], [], []
    for st in mid:
        spans.append(st[-1].time_range.end - st[0].time_range.start)
        busy.append(sum(k.time_range.end - k.time_range.start for k in st))
        gaps = [b.time_range.start - a.time_range.end for a, b in itertools.pairwise(st)]
        idle.append(sum(g for g in gaps if g > 0))
        for i, k in enumerate(st):
            row = order.setdefault(k.name[:90], [0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += k.time_range.end - k.time_range.start
            row[2] += gaps[i - 1] if i > 0 else 0.0
    n = len(mid)
    print(f"timeline: {n} steps, span {sum(spans) / n:.1f} us/step, kernel time "
          f"{sum(busy) / n:.1f} us, idle gaps {sum(idle) / n:.1f} us, "
          f"{sum(len(s) for s in mid) / n:.1f} kernels/step")
    print(f"{'per step':>8} {'mean us':>8} {'gap us':>8}  kernel")
    for name, (c, d, g) in sorted(order.items(), key=lambda kv: -kv[1][1]):
        print(f"{c / n:8.1f} {d / c:8.2f} {g / c:8.2f}  {name}")


if __name__ == "__main__":
    main()
