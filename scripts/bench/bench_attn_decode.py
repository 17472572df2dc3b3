"""Decode attention (one new token per sequence, read from the KV cache) on the GPU: the exact
kernel (`attention_cached_exact`, what exact mode runs) against the fast-mode decode kernel
(`attention_decode_split`) at the split and config `pick_decode` chooses and, with `--sweep`, at every
split and launch config, on Qwen3-1.7B heads (16 query, 8 KV, D 128, bf16 cache).

Roofline: a decode step must read each sequence's live K and V once,
    bytes = B * (pos + 1) * Hkv * D * 2 (K and V) * 2 (bf16),
so the floor is bytes / copy bandwidth (measured in the same run). Calls are replayed as one
CUDA graph (launch overhead out, as in the engine) over enough layer copies of the cache to
span 3x L2, so every call reads HBM as a real layer does.

    python scripts/bench/bench_attn_decode.py [--sweep] [--batches 1,16,64,256]
        [--contexts 320,1024,4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qmm import copy_gbs, ms_rotated

from orbit.kernels.attention_decode import DecodeConfig, attention_decode_split, pick_decode
from orbit.kernels.attention_exact import attention_cached_exact
from orbit.rollout.cuda_graphs import bucket, context_buckets

H, HKV, D = 16, 8, 128
SWEEP_CONFIGS = [DecodeConfig(bn, w, 2, pf) for bn, w, pf in
                 itertools.product((32, 64), (1, 2, 4), (False, True))] + [DecodeConfig(32, 2, 3)]


def bench_shape(B: int, live: int, sms: int, bw: float, sweep: bool) -> list[dict]:
    """Rows for batch B with every sequence at `live` positions: the exact kernel, then the
    decode kernel at pick_decode's choice (and, with `sweep`, every split x SWEEP_CONFIGS)."""
    dev = torch.device("cuda")
    max_ctx = bucket(live, context_buckets(max(live, 256)))
    layer_bytes = (B + 1) * max_ctx * HKV * D * 2 * 2
    copies = max(1, min(32, -(-150_000_000 // layer_bytes)))
    g = torch.Generator(device=dev).manual_seed(B * 7 + live)
    kcs = [torch.randn(B + 1, max_ctx, HKV, D, device=dev, generator=g).bfloat16() for _ in range(copies)]
    vcs = [torch.randn(B + 1, max_ctx, HKV, D, device=dev, generator=g).bfloat16() for _ in range(copies)]
    q = torch.randn(B, H, D, device=dev, generator=g).bfloat16()
    slots = torch.arange(1, B + 1, device=dev)
    start = torch.full((B,), live - 1, device=dev, dtype=torch.int64)
    cu = torch.arange(B + 1, device=dev, dtype=torch.int32)
    need = B * live * HKV * D * 2 * 2
    rows: list[dict] = []

    def emit(kind: str, us: float, **kw) -> None:
        row = {"B": B, "live": live, "max_context": max_ctx, "kind": kind, "us": us,
               "GBps": need / us / 1e3, "of_copy": need / us / 1e3 / bw, "floor_us": need / bw / 1e3, **kw}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def exact(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_cached_exact(q, k, v, cu, slots, start, 1)

    def decode(k: torch.Tensor, v: torch.Tensor, split: int, cfg: DecodeConfig) -> torch.Tensor:
        return attention_decode_split(q, k, v, slots, start, max_ctx, split, config=cfg)

    ref = exact(kcs[0], vcs[0])
    emit("exact", 1e3 * ms_rotated([lambda k=k, v=v: exact(k, v) for k, v in zip(kcs, vcs)]))
    auto, auto_cfg = pick_decode(B, HKV, max_ctx, sms)
    configs = [(auto, auto_cfg)]
    if sweep:
        configs += [(s, c) for s in (1, 2, 4, 8, 16) for c in SWEEP_CONFIGS
                    if s <= -(-max_ctx // c.block_n)]
    for split, cfg in configs:
        y = decode(kcs[0], vcs[0], split, cfg)
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        us = 1e3 * ms_rotated([lambda k=k, v=v, s=split, c=cfg: decode(k, v, s, c) for k, v in zip(kcs, vcs)])
        emit("decode", us, split=split, auto=split == auto and cfg == auto_cfg,
             block_n=cfg.block_n, warps=cfg.warps, stages=cfg.stages, prefetch=cfg.prefetch,
             rel_err_vs_exact=err)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--contexts", default="320,1024,4096", help="live positions + 1 (every sequence)")
    ap.add_argument("--sweep", action="store_true", help="every split x DecodeConfig in SWEEP_CONFIGS")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_gbs()
    rows: list[dict] = []
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps": bw, "sms": sms}), flush=True)
    for B, live in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        rows += bench_shape(B, live, sms, bw, args.sweep)
        torch.cuda.empty_cache()
    print("\n# best decode config per shape (us; exact kernel; auto = pick_decode's split and config)")
    for (B, live), grp in itertools.groupby(rows, key=lambda r: (r["B"], r["live"])):
        grp = list(grp)
        ex = next(r for r in grp if r["kind"] == "exact")
        au = next(r for r in grp if r.get("auto"))
        best = min((r for r in grp if r["kind"] == "decode"), key=lambda r: r["us"])
        print(f"B={B:4d} live={live:5d}: exact {ex['us']:7.1f}  auto(split {au['split']}) {au['us']:7.1f}  "
              f"best {best['us']:7.1f} (split {best['split']} bn {best['block_n']} w {best['warps']} "
              f"st {best['stages']} pf {int(best['prefetch'])}, {100 * best['of_copy']:.0f}% of copy)  "
              f"floor {ex['floor_us']:.1f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_attn_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
