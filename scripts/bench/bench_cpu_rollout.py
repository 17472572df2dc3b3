"""The quickstart's rollout on a CPU, per compute dtype: the embedded SmolLM2-135M-Instruct Q4_1
GGUF + LoRA r8, 16 prompts x 8 samples, 24 new tokens (EOS ignored so every dtype decodes the
same number of tokens), the SDPA attention backend, as the trainer's engine runs it.

    python scripts/bench/bench_cpu_rollout.py --dtypes float32,bf16 [--repeats 2] [--profile]

Prints one line per dtype and repeat (seconds, tok/s) and, with --profile, torch.profiler's
top ops of the last dtype. Runs alternate the dtypes, so a noisy machine hits both alike.
"""

from __future__ import annotations

import argparse
import time

import torch

from orbit.adapters import AdapterConfig, inject_adapters
from orbit.assets import default_gguf_path
from orbit.models.dtypes import cpu_has_native_bf16
from orbit.models.loader import load_model
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def build(dtype: torch.dtype) -> tuple[Engine, list[list[int]]]:
    """The engine over the embedded model in `dtype` and the 16 prompts."""
    torch.manual_seed(0)
    model, tok = load_model(default_gguf_path(), dtype=dtype, device="cpu")
    model.requires_grad_(False)
    inject_adapters(model, AdapterConfig(kind="lora", r=8, alpha=16, dtype=dtype))
    engine = Engine(model, max_num_seqs=128, max_model_len=280, device="cpu", tokenizer=tok,
                    attn_backend="sdpa")
    prompts = [tok.encode(f"What is {i * 37 % 91} + {i * 53 % 97}? Answer with a number.")
               for i in range(16)]
    return engine, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bf16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    names = args.dtypes.split(",")
    for n in names:
        if n not in DTYPES:
            raise SystemExit(f"--dtypes: {n!r} is not one of {sorted(DTYPES)}")
    sp = SamplingParams(temperature=0.6, max_new_tokens=24, ignore_eos=True, seed=1)
    engines = {n: build(DTYPES[n]) for n in names}
    for engine, prompts in engines.values():
        engine.generate(prompts[:2], sp, n=2)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}")
    for r in range(args.repeats):
        for n, (engine, prompts) in engines.items():
            t0 = time.perf_counter()
            engine.generate(prompts, sp, n=8)
            dt = time.perf_counter() - t0
            st = engine.last_stats
            print(f"{n:<8} run {r}: {dt:6.2f} s, {st['new_tokens'] / dt:7.1f} tok/s, "
                  f"KV cache {engine.dtype}")
    if args.profile:
        from torch.profiler import profile

        engine, prompts = engines[names[-1]]
        with profile() as p:
            engine.generate(prompts, sp, n=8)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
