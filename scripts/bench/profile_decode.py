"""Where a decode step's time goes in the native engine (GPU): one warm `Engine.generate`
under torch.profiler, then the per-op table (CUDA and CPU self time) and the wall time per
decode step. This is a diagnostic for issue 6's vs-transformers goal, not a benchmark row:
bench_engine.py gives the tokens/s that docs/benchmarks.md records.

    python scripts/bench/profile_decode.py [--shape smollm2-135m] [--batch 64] [--new 256]
        [--format int4] [--trace]
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = orbit_model(args.shape, dtype, device)
    if args.format != "bf16":
        from orbit.quant.convert import convert_linears

        convert_linears(model, "bf16" if args.format == "bf16-ql" else args.format)
    engine = Engine(model, max_num_seqs=args.batch, max_model_len=args.prompt_len + args.new + 8,
                    device=device, attn_backend=args.attn_backend)
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
    out = os.environ.get("OUT")
    if out and args.trace:
        prof.export_chrome_trace(os.path.join(out, "decode_trace.json"))


if __name__ == "__main__":
    main()
