"""Train-vs-rollout log-prob mismatch for every precision x adapter x mode, the conventional
baseline beside it, and what exact mode costs in rollout and training tokens/s.

    python scripts/bench/bench_alignment.py                      # GPU: Qwen3-1.7B-shaped random model
    python scripts/bench/bench_alignment.py --model tiny         # CPU smoke run (numbers tiny but real)
    python scripts/bench/bench_alignment.py --layers 8 --no-speed --out /tmp/align.json

Mismatch: the engine samples (prefill + decode, KV cache, CUDA graphs on GPU) and returns
log_softmax(logits/T) of each sampled token; the trainer path re-scores prompt+response with one
packed forward (orbit.alignment.measure). "conventional" = BF16 trainer, quantized copy for
rollout, same adapter values. Speed: rollout tokens/s of `Engine.generate` (second call, graphs
warm) and training tokens/s of packed forward+backward through token_logprobs, fast vs exact.
Prints a table and writes JSON (one record per row, rewritten after every row).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orbit.alignment.measure import measure_mismatch, random_prompts
from orbit.alignment.variants import (
    ADAPTERS,
    PRECISIONS,
    build_conventional,
    build_variant,
    random_model,
)
from orbit.entrypoints.preflight import random_config
from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.logprobs import token_logprobs
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_tokens_per_s(model: torch.nn.Module, aset, lens: list[int], device: torch.device, reps: int = 3) -> float:
    """Packed forward + backward (loss = -sum log p) over `lens` sequences; median of `reps`."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (sum(lens),), device=device)
    pos = positions_from_lengths(lens, device)
    cu = cu_seqlens_from_lengths(lens, device)
    targets = torch.roll(ids, -1)
    params = aset.trainable_parameters() if aset is not None else []
    times = []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            h = model(ids, pos, AttnBatch.packed(cu))
            loss = -token_logprobs(model, h, targets).sum()
            if loss.requires_grad:
                loss.backward()
        sync(device)
        if i:  # the first rep compiles kernels
            times.append(time.perf_counter() - t0)
        for p in params:
            p.grad = None
    return sum(lens) / statistics.median(times)


def rollout_tokens_per_s(engine: Engine, prompts: list[list[int]], sp: SamplingParams, n: int) -> float:
    engine.generate(prompts, sp, n)  # warm-up: compiles kernels, captures graphs
    engine.generate(prompts, dataclasses.replace(sp, seed=(sp.seed or 0) + 1), n)
    return engine.last_stats["tokens_per_s"]


def kernel_bench(emit, device: torch.device) -> None:
    """Exact matmul tile configs against torch (cuBLAS) at decode and training M."""
    from triton.testing import do_bench

    from orbit.kernels.matmul_exact import matmul_exact_triton

    configs = [(64, 64, 64, 4, 3), (64, 64, 128, 4, 4), (64, 32, 128, 4, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3)]
    for n, k in [(2048, 2048), (6144, 2048), (2048, 6144)]:
        w = torch.randn(n, k, device=device).bfloat16()
        for m in (32, 256, 8192):
            x = torch.randn(m, k, device=device).bfloat16()
            row = {"setup": "matmul", "M": m, "N": n, "K": k,
                   "torch_us": round(do_bench(lambda x=x, w=w: x @ w.T, return_mode="median") * 1e3, 2)}
            for c in configs:
                row["x".join(map(str, c)) + "_us"] = round(
                    do_bench(lambda x=x, w=w, c=c: matmul_exact_triton(x, w, None, c), return_mode="median") * 1e3, 2)
            emit(row)


def render(path: str) -> str:
    """Markdown tables (mismatch, speed, matmul) from a JSON this script wrote."""
    data = json.loads(Path(path).read_text())
    recs = data["records"]
    out = [f"device: {data['device']}, model: {data['model']}", "",
           "| setup | precision | adapter | mode | mean \\|r\\| | max \\|r\\| | frac r != 0 | KL k1 | KL k3 | tokens |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        m = r.get("metrics")
        if m:
            out.append(f"| {r['setup']} | {r['precision']} | {r['adapter']} | {r['mode']} | {m['mean_abs']:.2e} | "
                       f"{m['max_abs']:.2e} | {m['frac_diff']:.3f} | {m['kl_k1']:.1e} | {m['kl_k3']:.1e} | {m['n_tokens']} |")
    sp = [r for r in recs if r["setup"] == "speed"]
    if sp:
        out += ["", "| precision | rollout tok/s fast | exact | slowdown | train tok/s fast | exact | slowdown |",
                "|---|---|---|---|---|---|---|"]
        for r in sp:
            out.append(f"| {r['precision']}+LoRA | {r['rollout_tok_s']['fast']:.0f} | {r['rollout_tok_s']['exact']:.0f} | "
                       f"{r['rollout_slowdown']:.2f}x | {r['train_tok_s']['fast']:.0f} | {r['train_tok_s']['exact']:.0f} | "
                       f"{r['train_slowdown']:.2f}x |")
    mm = [r for r in recs if r["setup"] == "matmul"]
    if mm:
        keys = [k for k in mm[0] if k.endswith("_us")]
        out += ["", "| M | N | K | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
        for r in mm:
            out.append(f"| {r['M']} | {r['N']} | {r['K']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-1.7b", choices=("tiny", "qwen3-1.7b"))
    ap.add_argument("--layers", type=int, default=0, help="override num_layers for the mismatch sweep (0 = model's)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--adapters", default=",".join(ADAPTERS))
    ap.add_argument("--full-grid", action="store_true",
                    help="every precision x adapter; default: all precisions with LoRA, none/OFT for bf16 and int4")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--speed-precisions", default="bf16,int4")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                    help="time exact-matmul tile configs vs torch (CUDA only)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_alignment.json"))
    ap.add_argument("--render", default="", help="print markdown tables from this JSON and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = random_config(args.model)
    full_layers = cfg.num_layers
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    group = 32 if args.model == "tiny" else None
    precs = [p for p in args.precisions.split(",") if p]
    adapters = [a for a in args.adapters.split(",") if a]
    grid = [(p, a) for p in precs for a in adapters
            if args.full_grid or a == "lora" or p in ("bf16", "int4") or "lora" not in adapters]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={dev_name} model={args.model} layers={cfg.num_layers} dtype={dtype}", flush=True)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": dev_name, "model": args.model, "records": records}, indent=1))
        m = rec.get("metrics")
        if m:
            print(f"{rec['setup']:<12} {rec['precision']:<9} {rec['adapter']:<5} {rec['mode']:<5} "
                  f"mean={m['mean_abs']:.2e} max={m['max_abs']:.2e} diff={m['frac_diff']:.3f} "
                  f"k1={m['kl_k1']:.2e} k3={m['kl_k3']:.2e} n={m['n_tokens']}", flush=True)
        else:
            print(json.dumps(rec), flush=True)

    if args.kernels and device.type == "cuda":
        kernel_bench(emit, device)
    base = random_model(cfg, device, dtype, seed=0)
    prompts = random_prompts(args.prompts, cfg.vocab_size, min_len=8, max_len=64, seed=1)
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.max_new, seed=2, ignore_eos=True)
    max_len = 64 + args.max_new + 1
    seqs = args.prompts * args.n
    for prec, ad in grid:
        for mode in ("fast", "exact"):
            model, _ = build_variant(base, prec, ad, mode, group_size=group)
            eng = Engine(model, max_num_seqs=seqs, max_model_len=max_len, exact=mode == "exact")
            m = measure_mismatch(model, eng, prompts, sp, n=args.n).metrics
            emit({"setup": "orbit", "precision": prec, "adapter": ad, "mode": mode, "metrics": m.as_dict()})
            del model, eng
            free()
        if prec != "bf16":
            trainer, rollout, _ = build_conventional(base, prec, ad, group_size=group)
            eng = Engine(rollout, max_num_seqs=seqs, max_model_len=max_len)
            m = measure_mismatch(rollout, eng, prompts, sp, n=args.n, train_model=trainer).metrics
            emit({"setup": "conventional", "precision": prec, "adapter": ad, "mode": "fast", "metrics": m.as_dict()})
            del trainer, rollout, eng
            free()
    del base
    free()

    if args.speed:
        cfg_s = dataclasses.replace(cfg, num_layers=full_layers)
        base = random_model(cfg_s, device, dtype, seed=0)
        n_seq = 32 if device.type == "cuda" else 2
        new = 128 if device.type == "cuda" else 8
        sp_s = SamplingParams(temperature=1.0, max_new_tokens=new, seed=5, ignore_eos=True)
        p_s = random_prompts(n_seq, cfg.vocab_size, min_len=32, max_len=128, seed=6)
        lens = [1024] * 8 if device.type == "cuda" else [32, 16]
        for prec in [p for p in args.speed_precisions.split(",") if p]:
            rates = {}
            for mode in ("fast", "exact"):
                model, aset = build_variant(base, prec, "lora", mode, group_size=group)
                eng = Engine(model, max_num_seqs=n_seq, max_model_len=128 + new + 1, exact=mode == "exact")
                roll = rollout_tokens_per_s(eng, p_s, sp_s, 1)
                eng.release_kv_cache()
                train = train_tokens_per_s(model, aset, lens, device)
                rates[mode] = (roll, train)
                del model, aset, eng
                free()
            emit({"setup": "speed", "precision": prec, "adapter": "lora", "layers": cfg_s.num_layers,
                  "rollout_seqs": n_seq, "rollout_new_tokens": new, "train_tokens": sum(lens),
                  "rollout_tok_s": {k: round(v[0], 1) for k, v in rates.items()},
                  "train_tok_s": {k: round(v[1], 1) for k, v in rates.items()},
                  "rollout_slowdown": round(rates["fast"][0] / rates["exact"][0], 3),
                  "train_slowdown": round(rates["fast"][1] / rates["exact"][1], 3)})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
