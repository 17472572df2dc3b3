"""Benchmark the adapter hot spots at Qwen3-4B shapes: the push (stage train slot -> serve
slot) and the OFT input rotation against the base GEMM it precedes.

Push: LoRA r=32 and OFT b=32 on all 7 linears of 36 layers (q 2560->4096, k/v 2560->1024,
o 4096->2560, gate/up 2560->9728, down 9728->2560). Bases are meta-device linears (only the
adapter tensors are real), so this runs on a CPU too. Compared in the same run: one flat copy
(what `AdapterSet.stage` does) against one copy per tensor (a naive push), and the device
copy bandwidth of a same-size buffer. "host_ms" is how long `stage()` blocks the Python thread.
Rotation: `oft_rotate` (Triton on CUDA, torch reference on CPU) against the bf16 `x @ W.T` of
the same linear, and the per-step cost (forward + backward) of building R from Q for all 252
linears, one module at a time vs the batched build the training forward uses.
Writes JSON to $OUT/bench_adapters.json (or --out) and prints a table.

    python scripts/bench/bench_adapters.py [--layers 36] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.adapters.lora import LoRALinear  # noqa: E402
from orbit.adapters.oft import OFTLinear, build_step_rotations  # noqa: E402
from orbit.adapters.slots import FlatSlots  # noqa: E402
from orbit.kernels.oft_rotate import oft_rotate, triton_usable  # noqa: E402

# Qwen3-4B: (name, in, out)
LINEARS = [
    ("q_proj", 2560, 4096),
    ("k_proj", 2560, 1024),
    ("v_proj", 2560, 1024),
    ("o_proj", 4096, 2560),
    ("gate_proj", 2560, 9728),
    ("up_proj", 2560, 9728),
    ("down_proj", 9728, 2560),
]


def timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of `fn` (synchronized on CUDA)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build(kind: str, layers: int, device: torch.device) -> dict[str, nn.Module]:
    mods = {}
    for i in range(layers):
        for name, k, n in LINEARS:
            base = nn.Linear(k, n, bias=False, device="meta")
            if kind == "lora":
                m = LoRALinear(base, r=32, alpha=64, dtype=torch.bfloat16, device=device)
            else:
                m = OFTLinear(base, block_size=32, dtype=torch.bfloat16, device=device)
            mods[f"model.layers.{i}.{name}"] = m
    return mods


def bench_push(kind: str, layers: int, device: torch.device, reps: int) -> dict:
    mods = build(kind, layers, device)
    slots = FlatSlots(mods, torch.bfloat16)
    nbytes = slots.numel * 2
    with torch.no_grad():
        slots.flat(0).normal_()
    flat_ms = timed(lambda: slots.stage(0, 1), device, reps)
    host = []
    for _ in range(reps):
        t0 = time.perf_counter()
        slots.stage(0, 1)
        host.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize()
    pairs = [
        (m.slot_tensor(0, n), m.slot_tensor(1, n)) for m in mods.values() for n in m.slot_names
    ]

    def naive() -> None:
        with torch.no_grad():
            for s, d in pairs:
                d.copy_(s)

    naive_ms = timed(naive, device, reps)
    a = torch.empty(slots.numel, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    copy_ms = timed(lambda: b.copy_(a), device, reps)
    assert torch.equal(slots.flat(0), slots.flat(1))
    return {
        "bench": "push",
        "kind": kind,
        "layers": layers,
        "tensors": len(pairs),
        "params": sum(s.numel() for s, _ in pairs),
        "MB": nbytes / 1e6,
        "stage_ms": flat_ms,
        "host_ms": statistics.median(host),
        "per_tensor_ms": naive_ms,
        "raw_copy_ms": copy_ms,
        "GBps": 2 * nbytes / flat_ms / 1e6,
    }


def bench_rotation(device: torch.device, ms_list: list[int], reps: int) -> list[dict]:
    rows = []
    for name, k, n in LINEARS:
        if name in ("k_proj", "v_proj", "up_proj"):
            continue  # same input width (and rotation) as q_proj / gate_proj
        w = (torch.randn(n, k, device=device) * 0.02).bfloat16()
        q = torch.randn(k // 32, 32 * 31 // 2, device=device) * 0.05
        mod = OFTLinear(
            nn.Linear(k, n, bias=False, device="meta"),
            block_size=32,
            dtype=torch.float32,
            device=device,
        )
        with torch.no_grad():
            mod.oft_R.copy_(q)
        rot = mod.rotation(0).detach()
        for m in ms_list:
            x = torch.randn(m, k, device=device).bfloat16()
            t_rot = timed(lambda x=x, rot=rot: oft_rotate(x, rot), device, reps)
            t_gemm = timed(lambda x=x, w=w: x @ w.T, device, reps)
            rows.append(
                {
                    "bench": "rotate",
                    "linear": name,
                    "k": k,
                    "n": n,
                    "m": m,
                    "path": "triton" if triton_usable(x, rot) else "torch",
                    "rotate_ms": t_rot,
                    "gemm_ms": t_gemm,
                    "ratio": t_rot / t_gemm,
                    "rotate_GBps": 2 * 2 * m * k / t_rot / 1e6,
                }
            )
    return rows


def bench_build_r(layers: int, device: torch.device, reps: int) -> dict:
    """R for all OFT linears, forward + backward: one module at a time vs batched."""
    mods = list(build("oft", layers, device).values())
    with torch.no_grad():
        for m in mods:
            m.oft_R.normal_(0, 0.05)

    def per_module() -> None:
        sum(m.rotation(0).sum() for m in mods).backward()

    def batched() -> None:
        build_step_rotations(mods)
        sum(m._step_rot[2].sum() for m in mods).backward()

    r = max(3, reps // 4)
    return {
        "bench": "build_R",
        "layers": layers,
        "modules": len(mods),
        "per_module_ms": timed(per_module, device, r),
        "batched_ms": timed(batched, device, r),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument(
        "--quick", action="store_true", help="fewer reps / token counts (CPU smoke run)"
    )
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_adapters.json)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 5 if args.quick else (50 if device.type == "cuda" else 10)
    token_counts = [1, 64] if args.quick else [1, 16, 4096, 8192]
    torch.manual_seed(0)
    rows = [bench_push(kind, args.layers, device, reps) for kind in ("lora", "oft")]
    rows += bench_rotation(device, token_counts, reps)
    rows.append(bench_build_r(args.layers, device, reps))
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "argv": sys.argv[1:],
    }
    out = args.out or (
        os.path.join(os.environ["OUT"], "bench_adapters.json") if os.environ.get("OUT") else None
    )
    if out:
        Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"# {meta['device']}  {meta['date']}")
    print(
        f"{'push':6} {'MB':>7} {'tensors':>7} {'stage ms':>9} {'host ms':>8} {'per-tensor ms':>13} {'raw copy ms':>11} {'GB/s':>7}"
    )
    for r in rows:
        if r["bench"] == "push":
            print(
                f"{r['kind']:6} {r['MB']:7.1f} {r['tensors']:7d} {r['stage_ms']:9.3f} {r['host_ms']:8.3f} "
                f"{r['per_tensor_ms']:13.3f} {r['raw_copy_ms']:11.3f} {r['GBps']:7.1f}"
            )
    print(
        f"\n{'linear':10} {'k':>5} {'n':>5} {'m':>5} {'path':>6} {'rotate ms':>10} {'gemm ms':>9} {'ratio':>6}"
    )
    for r in rows:
        if r["bench"] == "rotate":
            print(
                f"{r['linear']:10} {r['k']:5d} {r['n']:5d} {r['m']:5d} {r['path']:>6} "
                f"{r['rotate_ms']:10.4f} {r['gemm_ms']:9.4f} {r['ratio']:6.2f}"
            )
    b = rows[-1]
    print(
        f"\nR for {b['modules']} OFT linears (Cayley-Neumann, 5 terms), forward + backward: "
        f"{b['per_module_ms']:.2f} ms one module at a time, {b['batched_ms']:.2f} ms batched"
    )
    if out:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
