"""Each kernel of a batch-1 decode step on its own (Nsight Compute), against the step's time.

Under ncu every kernel runs alone (serialized, no PDL overlap, no launch gap), so the sum of
their durations over a step is what the step would take with free launches; the difference to
the step's measured time (printed first, from a warm run outside ncu's range) is what launch
gaps, PDL waits and serialization cost. Run:

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


def _number(v: str) -> float:
    return float(v.replace(",", "")) if v not in ("", "n/a") else 0.0


def summarize(path: str, steps: int) -> None:
    """Per kernel name over the profiled range (the prefill's kernels included: they are
    flagged by launches per step that are not whole)."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"ID"'))
    rows = list(csv.DictReader(lines[start:]))
    per: dict[int, dict[str, str]] = defaultdict(dict)
    for r in rows:
        k = per[int(r["ID"])]
        k["name"] = r["Kernel Name"]
        k[r["Metric Name"]] = r["Metric Value"]
        k[r["Metric Name"] + " unit"] = r["Metric Unit"]
    by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    total = 0.0
    for k in per.values():
        ns = _number(k.get("gpu__time_duration.sum", "0"))
        ns *= {"usecond": 1e3, "msecond": 1e6}.get(k.get("gpu__time_duration.sum unit"), 1)
        b = _number(k.get("dram__bytes_read.sum", "0"))
        b *= {"Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(k.get("dram__bytes_read.sum unit"), 1)
        row = by[k["name"][:80]]
        row[0] += 1
        row[1] += ns / 1e3
        row[2] += b
        row[3] = _number(k.get("launch__grid_size", "0"))
        row[4] = _number(k.get("launch__registers_per_thread", "0"))
        total += ns / 1e3
    print(f"{len(per)} kernels, {total:.1f} us in all = {total / steps:.1f} us per step "
          f"(prefill included)")
    print(f"{'per step':>8} {'mean us':>8} {'us/step':>8} {'MB/launch':>9} {'GB/s':>7} "
          f"{'grid':>6} {'regs':>4}  kernel")
    for name, (c, us, b, grid, regs) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{c / steps:8.2f} {us / c:8.2f} {us / steps:8.1f} {b / c / 1e6:9.2f} "
              f"{b / max(us, 1e-9) / 1e3:7.0f} {grid:6.0f} {regs:4.0f}  {name}")


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
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize, args.steps)
    else:
        profile(args)


if __name__ == "__main__":
    main()
