"""What int4_mma's weight loads alone cost: the ceiling of its memory access pattern (issue 3).

Nsight put the INT4 mma kernel at 48% of DRAM peak with most of each warp's time waiting on
global loads (docs/kernels.md, session 21), and its NVFP4 form (more decode work per byte)
runs at the same bytes per second, so the decode and the MMAs are not what bounds it. This
script times a Gluon kernel with int4_mma's word layout, pointer walk, prefetch depth, grid
and split, whose only work per step is an XOR of the loaded words (stored at the end, so
nothing is dead code), next to the real kernel, cuBLAS BF16 and the device copy, in one
process. Variants:
  - vec: words one thread loads per weight row and step (4: int4_mma's 16-byte vector, 64
    contiguous bytes per row and step across a lane quad; 8 and 16: 128 and 256 bytes);
  - prefetch: steps loaded ahead of the one being reduced (0-3);
  - split and row tiles as in MmaConfig.
If the loads alone take about as long as the kernel, the access pattern is the ceiling and a
wider step (vec) or a different grid is the lever; if they are much faster, the per-step
compute chain is. Session 22 (H100, docs/benchmarks.md): 4096x12288 at the pick's grid, loads
alone 14.5 us with one step ahead and 12.7 us with two, the kernel 17.6 us: the latter.

Run (GPU): python scripts/bench/bench_mma_loads.py [--shapes 4096x12288] [--m 4]
Writes $OUT/bench_mma_loads.json (or --out).
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
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_qmm import copies_for, copy_gbs, ms_rotated

from orbit.kernels.int4_mma import HAS_GLUON, MmaConfig, int4_mma, layouts

if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def _loads_kernel(q_ptr, out_ptr, N, K_SLICE_W, stride_q, VEC: gl.constexpr,
                      BN: gl.constexpr, DEPTH: gl.constexpr, LW: gl.constexpr):
        # int4_mma's word pointers [BN, 4, VEC] and prefetch walk; the step's work is an XOR
        BKW: gl.constexpr = 4 * VEC  # words of one row per step
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        LW2: gl.constexpr = gl.SliceLayout(2, LW)
        r = gl.minimum(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, LW2)), N - 1)
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, LW2))
        i = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        w3 = gl.expand_dims(gl.expand_dims(t, 0), 2) * VEC + gl.expand_dims(
            gl.expand_dims(i, 0), 1)
        w_ptrs = q_ptr + gl.expand_dims(gl.expand_dims(r, 1), 2) * stride_q + (
            pid_k * K_SLICE_W + w3)
        acc = gl.zeros([BN, 4, VEC], gl.int32, LW)
        if DEPTH >= 1:
            w0 = gl.load(w_ptrs)
        if DEPTH >= 2:
            w_ptrs += gl.where(BKW < K_SLICE_W, BKW, 0)
            w1 = gl.load(w_ptrs)
        if DEPTH >= 3:
            w_ptrs += gl.where(2 * BKW < K_SLICE_W, BKW, 0)
            w2 = gl.load(w_ptrs)
        for kk in range(0, K_SLICE_W, BKW):
            if DEPTH == 0:
                cur = gl.load(w_ptrs)
                w_ptrs += BKW
            else:
                cur = w0
                w_ptrs += gl.where(kk + DEPTH * BKW < K_SLICE_W, BKW, 0)
                if DEPTH == 1:
                    w0 = gl.load(w_ptrs)
                elif DEPTH == 2:
                    w0 = w1
                    w1 = gl.load(w_ptrs)
                else:
                    w0 = w1
                    w1 = w2
                    w2 = gl.load(w_ptrs)
            acc = acc ^ cur
        o = (pid_k * gl.num_programs(0) + pid_n) * (BN * 4 * VEC)
        rr = gl.arange(0, BN, layout=gl.SliceLayout(1, LW2))
        optr = out_ptr + o + gl.expand_dims(gl.expand_dims(rr, 1), 2) * (4 * VEC) + w3
        gl.store(optr, acc)


    @gluon.jit
    def _laid_out_loads_kernel(q_ptr, out_ptr, K_SLICE_W, BASE_N, BASE_K, ROW, ADV,
                               VEC: gl.constexpr, BN: gl.constexpr, DEPTH: gl.constexpr,
                               LW: gl.constexpr):
        # the same per-thread words and walk as _loads_kernel over another placement of the
        # words in memory: program (n, k)'s step s, row r, word w at
        # n BASE_N + k BASE_K + s ADV + r ROW + w (LAYOUTS); DEPTH 1 or 2
        BKW: gl.constexpr = 4 * VEC
        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        LW2: gl.constexpr = gl.SliceLayout(2, LW)
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, LW2))
        t = gl.arange(0, 4, layout=gl.SliceLayout(0, LW2))
        i = gl.arange(0, VEC, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW)))
        w3 = gl.expand_dims(gl.expand_dims(t, 0), 2) * VEC + gl.expand_dims(
            gl.expand_dims(i, 0), 1)
        w_ptrs = q_ptr + (pid_n.to(gl.int64) * BASE_N + pid_k * BASE_K) + (
            gl.expand_dims(gl.expand_dims(r, 1), 2) * ROW + w3)
        acc = gl.zeros([BN, 4, VEC], gl.int32, LW)
        steps = K_SLICE_W // BKW
        w0 = gl.load(w_ptrs)
        if DEPTH >= 2:
            w_ptrs += gl.where(1 < steps, ADV, 0)
            w1 = gl.load(w_ptrs)
        for s in range(steps):
            cur = w0
            w_ptrs += gl.where(s + DEPTH < steps, ADV, 0)
            if DEPTH == 1:
                w0 = gl.load(w_ptrs)
            else:
                w0 = w1
                w1 = gl.load(w_ptrs)
            acc = acc ^ cur
        o = (pid_k * gl.num_programs(0) + pid_n) * (BN * 4 * VEC)
        optr = out_ptr + o + gl.expand_dims(gl.expand_dims(r, 1), 2) * (4 * VEC) + w3
        gl.store(optr, acc)


# where program (n, k)'s words sit, for `laid_out_loads` (K_SLICE_W words of a row per slice,
# BKW per step, T row tiles of BN rows):
#   rows: the checkpoint's [N, K/8] (int4_mma's; rows 2 KB apart at K 4096);
#   slices: [split][N][K_SLICE_W] (each program's rows contiguous, a step still 64 bytes of
#           each of BN rows);
#   tiles: [T][split][step][BN][BKW] (each program's step one contiguous BN x 64-byte block,
#          a pre-shuffled layout such as Marlin's).
LAYOUTS = ("rows", "slices", "tiles")


def laid_out_loads(buf: torch.Tensor, n: int, kw: int, cfg: MmaConfig, vec: int, layout: str,
                   out: torch.Tensor) -> torch.Tensor:
    """The XOR of the words of a [T BN, kw] int32 buffer `buf` (flat) read as `layout`."""
    bn, bkw = cfg.block_n, 4 * vec
    tiles = -(-n // bn)
    ksw = kw // cfg.split
    if layout == "rows":
        strides = (bn * kw, ksw, kw, bkw)
    elif layout == "slices":
        strides = (bn * ksw, tiles * bn * ksw, ksw, bkw)
    else:
        strides = (cfg.split * bn * ksw, bn * ksw, bkw, bn * bkw)
    lw = layouts(cfg.warps, cfg.row_tiles, 8, vec)[3]
    _laid_out_loads_kernel[(tiles, cfg.split)](buf, out, ksw, *strides, VEC=vec, BN=bn,
                                               DEPTH=max(1, cfg.prefetch), LW=lw,
                                               num_warps=cfg.warps)
    return out


def loads_only(q: torch.Tensor, cfg: MmaConfig, vec: int, out: torch.Tensor) -> torch.Tensor:
    """The XOR of every word q [N, K/8] int32, in int4_mma's order for `cfg` with `vec` words
    per thread, row and step; `out` holds one [BN, 4, vec] tile per program."""
    n, kw = q.shape
    lw = layouts(cfg.warps, cfg.row_tiles, 8, vec)[3]
    tiles = -(-n // cfg.block_n)
    if kw % (cfg.split * 4 * vec):
        raise ValueError(f"K/8 = {kw} is not a multiple of split {cfg.split} x {4 * vec}")
    _loads_kernel[(tiles, cfg.split)](q, out, n, kw // cfg.split, q.stride(0), VEC=vec,
                                      BN=cfg.block_n, DEPTH=cfg.prefetch, LW=lw,
                                      num_warps=cfg.warps)
    return out


def _xor_all(t: torch.Tensor) -> int:
    t = t.view(-1).to(torch.int64) & 0xFFFFFFFF
    r = torch.zeros((), dtype=torch.int64, device=t.device)
    for b in range(32):
        r |= ((t >> b) & 1).sum() % 2 << b
    return int(r)


def check(q: torch.Tensor, cfg: MmaConfig, vec: int) -> None:
    """The loads-only kernel reads every word once: XOR of its tiles == XOR of q."""
    tiles = -(-q.shape[0] // cfg.block_n)
    out = torch.zeros(tiles * cfg.split * cfg.block_n * 4 * vec, dtype=torch.int32,
                      device=q.device)
    loads_only(q, cfg, vec, out)
    pad = tiles * cfg.block_n - q.shape[0]  # clamped tail rows read row N - 1 again
    want = q.view(-1)
    if pad:
        want = torch.cat([want, q[-1].repeat(pad)])

    if _xor_all(out) != _xor_all(want):
        raise RuntimeError(f"loads-only kernel missed words ({cfg}, vec {vec})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="4096x12288,2048x12288,6144x2048")
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--layouts-only", action="store_true",
                    help="only vec 4 at depth 1-2 of the rows walk, then the LAYOUTS rows")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from orbit.kernels.gemv import num_sms
    from orbit.kernels.int4_mma import pick_config
    from orbit.kernels.random_weights import random_qweight

    dev = torch.device("cuda")
    bw = copy_gbs()
    rows = []
    print(f"copy {bw:.0f} GB/s")
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        qws = [random_qweight("int4", n, k, group_size=128, seed=i, device=dev)
               for i in range(copies_for(n * k // 2))]
        x = torch.randn(args.m, k, device=dev).bfloat16()
        nbytes = qws[0].nbytes()
        # (the loads-only kernel walks split programs, so it mirrors the split-K pick; the
        # shipped pick, warps along K, is timed as int4_mma too)
        pick = pick_config(args.m, k, n, 128, num_sms(dev), warp_k=1)
        shipped = pick_config(args.m, k, n, 128, num_sms(dev))
        wbs = [torch.randn(n, k, device=dev).bfloat16() for _ in range(copies_for(2 * n * k))]
        plan = [("cublas-bf16", None, 0), ("int4_mma", pick, 4)]
        if shipped != pick:
            plan.append(("int4_mma", shipped, 4))
        for vec in (4,) if args.layouts_only else (4, 8, 16):
            for depth in (1, 2) if args.layouts_only else (0, 1, 2, 3):
                for split in sorted({max(1, pick.split // 2), pick.split, pick.split * 2}):
                    c = MmaConfig(pick.warps, pick.row_tiles, split, depth)
                    if (k // 8) % (split * 4 * vec) == 0 and (k // 8) // split >= 4 * vec:
                        plan.append(("loads", c, vec))
        tiles_ = -(-n // pick.block_n)
        bufs = [torch.randint(-2**31, 2**31 - 1, (tiles_ * pick.block_n * (k // 8),),
                              dtype=torch.int32, device=dev)
                for _ in range(copies_for(n * k // 2))]
        for lay in LAYOUTS:  # the same grid and walk over three placements of the words
            for depth in (1, 2):
                plan.append((f"laid-{lay}", dataclasses.replace(pick, prefetch=depth), 4))
        for name, cfg, vec in plan:
            if name == "cublas-bf16":
                fns = [lambda w=w, x=x: x @ w.T for w in wbs]
                nb = 2 * n * k
            elif name == "int4_mma":
                fns = [lambda q=q, c=cfg, x=x: int4_mma(x, q.tensors["qweight"],
                                                        q.tensors["scale"], 128, c)
                       for q in qws]
                nb = nbytes
            elif name.startswith("laid-"):
                lay = name[len("laid-"):]
                out = torch.empty(tiles_ * cfg.split * cfg.block_n * 4 * vec, dtype=torch.int32,
                                  device=dev)
                want = _xor_all(bufs[0])
                if _xor_all(laid_out_loads(bufs[0], n, k // 8, cfg, vec, lay, out)) != want:
                    raise RuntimeError(f"{name} missed words")
                fns = [lambda b=b, c=cfg, v=vec, o=out, ly=lay, n_=n, kw_=k // 8: laid_out_loads(
                    b, n_, kw_, c, v, ly, o) for b in bufs]
                nb = n * k // 2
            else:
                check(qws[0].tensors["qweight"], cfg, vec)
                tiles = -(-n // cfg.block_n)
                out = torch.empty(tiles * cfg.split * cfg.block_n * 4 * vec, dtype=torch.int32,
                                  device=dev)
                fns = [lambda q=q, c=cfg, v=vec, o=out: loads_only(q.tensors["qweight"], c, v, o)
                       for q in qws]
                nb = n * k // 2
            t = ms_rotated(fns)
            row = {"shape": shape, "m": args.m, "kernel": name, "vec": vec,
                   "cfg": None if cfg is None else list(cfg.__dict__.values()),
                   "us": t * 1e3, "GBps": nb / t / 1e6, "frac_copy": nb / t / 1e6 / bw}
            rows.append(row)
            print(f"{shape:>11} {name:>12} vec {vec:>2} cfg {row['cfg']}  {row['us']:7.2f} us "
                  f"{row['GBps']:6.0f} GB/s ({row['frac_copy']:.0%} of copy)", flush=True)
        del qws, wbs, bufs
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_mma_loads.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "copy_GBps": bw, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
