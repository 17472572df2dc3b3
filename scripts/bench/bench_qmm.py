"""Benchmark the fused quantized matmuls against cuBLAS BF16 `x @ W.T` in one run.

Decode (M in {1, 16}): weight-bandwidth bound; reports time, speedup over BF16 and achieved
bandwidth (bytes of weight + scales + x + y over time) against a device-to-device copy
measured in the same run. Training (M in {4096, 8192}): forward and input-gradient speed
against BF16. Times are `triton.testing.do_bench` medians. Decode calls rotate over enough weight copies
to span 3x the 50 MB L2 and are replayed as one CUDA graph (launch overhead out, as in a
graphed engine step); training calls are single launches (do_bench zeroes a 256 MB buffer
before each, so L2 starts cold).
`--gemv` runs only the decode comparison of the old fused `tl.dot` kernel and the GEMV /
split-K path (orbit/kernels/gemv.py) at M in {1, 4, 16} for int4/fp8/nvfp4 against cuBLAS
BF16, same rotation and graph replay; `--gemv-sweep` adds the GEMV_ALTS configs
(`--gemv-deep`: GEMV_ALTS_DEEP, `--gemv-wide`: GEMV_ALTS_WIDE, `--gemv-xpre`: GEMV_ALTS_XPRE
instead; FP8 at M <= FP8_GEMV_MAX_M gets FP8_ALTS with --gemv-sweep, and a `gemv-v1` row, the
tile kernel it replaced; `--gemv-formats fp8` narrows the formats; every M = 1 call also gets
`gemv-pdl` rows (programmatic dependent launch, orbit/kernels/pdl.py; `-l2`: with the L2
prefetch of the first steps' weights as well); at M = 1 the plane formats also get `gemv-s5` (session 5's kernel) and `gemv-noxpre`
rows, the same-run baselines of the session-6 changes), `--gemv-swap` the
swap-AB dot kernel (SWAP_ALTS); `--gemv-shapes 4096x12288,...` and `--gemv-m 1,4` narrow it.
`--mid` times rollout batch sizes (16-512 rows, Qwen3-1.7B shapes, `--gemv-formats`): the
`tl.dot` loop fast mode runs there against dequantize + cuBLAS and cuBLAS BF16.
Writes JSON to $OUT/bench_qmm.json (or --out) and prints a short table last.

    python scripts/bench/bench_qmm.py [--quick] [--sweep] [--gemv [--gemv-sweep]]
"""

# ruff: noqa: B023  (every closure below is timed inside the loop iteration that made it)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.kernels import _qgemm
from orbit.kernels.dispatch import qmm, qmm_t
from orbit.kernels.qmm_tune import graph_timer
from orbit.kernels.random_weights import random_qweight

DECODE_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192),
                 (2048, 6144), (2560, 9728), (4096, 12288)]  # (in, out)
TRAIN_SHAPES = [(2048, 6144), (2560, 9728), (4096, 12288)]


def variants(k: int) -> list[tuple[str, str, dict]]:
    g = 128 if k % 128 == 0 else 64
    return [("int4", f"int4-g{g}", {"group_size": g}), ("int8", "int8-g32", {"group_size": 32}),
            ("fp8", "fp8-w8a16", {}), ("nvfp4", "nvfp4", {}), ("mxfp4", "mxfp4", {})]


def _emit(rows: list[dict], row: dict) -> None:
    """Keep the row and print it at once, so a run cut off at its time limit still reports."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def ms_rotated(fns: list) -> float:
    """Median ms per call of fns (closures over different weight copies, together larger than
    L2), replayed as one CUDA graph so Python and launch overheads drop out, as in an engine
    that graphs its decode step (the tuner's timer, orbit/kernels/qmm_tune.py)."""
    return graph_timer(reps=100, warmup=25)(fns) * 1e3


def copies_for(nbytes: int) -> int:
    """Weight copies that together span 3x the H100's 50 MB L2 (so no call hits L2)."""
    return max(2, min(1000, -(-150_000_000 // nbytes)))


def copy_gbs() -> float:
    """Device-to-device copy bandwidth (GB/s, bytes read + written): the median of a 512 MiB
    bf16 copy. The roofline every decode benchmark reports against (bench_engine,
    bench_attn_decode use this one too)."""
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    return 2 * n * 2 / ms(lambda: b.copy_(a)) / 1e6


def ceilings() -> dict:
    bw = copy_gbs()
    s = 8192
    x = torch.randn(s, s, device="cuda").bfloat16()
    w = torch.randn(s, s, device="cuda").bfloat16()
    tf = 2 * s**3 / ms(lambda: x @ w.T) / 1e9
    return {"copy_GBps": bw, "bf16_TFLOPs": tf}


def decode(quick: bool, copy_gbs: float) -> list[dict]:
    rows = []
    for k, n in DECODE_SHAPES[-3:] if quick else DECODE_SHAPES:
        nb = copies_for(2 * n * k)
        wbs = [torch.randn(n, k, device="cuda").bfloat16() * 0.05 for _ in range(nb)]
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda").bfloat16()
            t_bf = ms_rotated([lambda w=w: x @ w.T for w in wbs])
            _emit(rows, {"phase": "decode", "fmt": "bf16-cublas", "k": k, "n": n, "m": m,
                         "ms": t_bf, "speedup": 1.0, "copies": nb,
                         "GBps": (2 * n * k + 2 * m * (n + k)) / t_bf / 1e6})
        del wbs
        for fmt, name, kw in variants(k):
            qw0 = random_qweight(fmt, n, k, device="cuda", **kw)
            nq = copies_for(qw0.nbytes())
            qws = [random_qweight(fmt, n, k, seed=i, device="cuda", **kw) for i in range(nq)]
            for m in (1, 16):
                x = torch.randn(m, k, device="cuda").bfloat16()
                t_bf = next(r["ms"] for r in rows if r["fmt"] == "bf16-cublas"
                            and (r["k"], r["n"], r["m"]) == (k, n, m))
                for exact in (False, True):
                    t = ms_rotated([lambda q=q: qmm(x, q, exact=exact) for q in qws])
                    gbs = (qw0.nbytes() + 2 * m * (n + k)) / t / 1e6
                    _emit(rows, {"phase": "decode", "fmt": name + ("-exact" if exact else ""),
                                 "k": k, "n": n, "m": m, "ms": t, "speedup": t_bf / t,
                                 "GBps": gbs, "frac_copy_bw": gbs / copy_gbs, "copies": nq})
            del qws
    return rows


MID_SHAPES = [(2048, 2048), (2048, 1024), (2048, 6144), (6144, 2048)]  # Qwen3-1.7B (in, out)
MID_M = (16, 32, 64, 128, 256, 512)


def bf16_baseline(rows: list[dict], phase: str, fmt: str, k: int, n: int, ms_: tuple,
                  copy_gbs: float) -> dict[int, float]:
    """cuBLAS BF16 `x @ W.T` ms per call at each M of ms_ for an [n, k] weight, rotated over
    copies spanning 3x L2 and graph-replayed; one row each (the same-run baseline)."""
    wbs = [torch.randn(n, k, device="cuda").bfloat16() * 0.05
           for _ in range(copies_for(2 * n * k))]
    t_bf = {}
    for m in ms_:
        x = torch.randn(m, k, device="cuda").bfloat16()
        t_bf[m] = ms_rotated([lambda w=w: x @ w.T for w in wbs])
        gbs = (2 * n * k + 2 * m * (n + k)) / t_bf[m] / 1e6
        _emit(rows, {"phase": phase, "fmt": fmt, "path": "cublas", "k": k, "n": n, "m": m,
                     "ms": t_bf[m], "speedup": 1.0, "GBps": gbs, "frac_copy_bw": gbs / copy_gbs})
    return t_bf


def _with_dequant_min_m(rows: int, fn, *args):
    """fn(*args) with fast mode's dequantize-then-cuBLAS threshold at `rows` for every format
    (restored after)."""
    old = _qgemm.DEQUANT_MIN_M, _qgemm.DEQUANT_MIN_M_BY_FMT
    _qgemm.DEQUANT_MIN_M, _qgemm.DEQUANT_MIN_M_BY_FMT = rows, {}
    try:
        return fn(*args)
    finally:
        _qgemm.DEQUANT_MIN_M, _qgemm.DEQUANT_MIN_M_BY_FMT = old


def mid_decode(copy_gbs: float, formats: tuple[str, ...], ms_list: tuple[int, ...]) -> list[dict]:
    """Rollout batch sizes (`--mid`): the `tl.dot` loop (or a route table's pick) at 16-512
    rows against dequantize-into-BF16 + cuBLAS (what fast mode does from
    `_qgemm.dequant_min_m(fmt)` rows on, the dequantization pass included) and cuBLAS BF16
    itself, each rotated over weight copies spanning 3x L2 and graph-replayed, to place that
    threshold per format."""
    rows = []
    for k, n in MID_SHAPES:
        base = bf16_baseline(rows, "mid", "bf16-cublas", k, n, ms_list, copy_gbs)
        for fmt in formats:
            kw = {"group_size": 128} if fmt == "int4" else {}
            qw0 = random_qweight(fmt, n, k, device="cuda", **kw)
            qws = [random_qweight(fmt, n, k, seed=i, device="cuda", **kw)
                   for i in range(copies_for(qw0.nbytes()))]
            for m in ms_list:
                x = torch.randn(m, k, device="cuda").bfloat16()
                for path, min_m in (("dot-loop", 1 << 30), ("dequant+cublas", 1)):
                    calls = [lambda q=q: qmm(x, q) for q in qws]
                    t = _with_dequant_min_m(min_m, ms_rotated, calls)
                    _emit(rows, {"phase": "mid", "fmt": fmt, "path": path, "k": k, "n": n, "m": m,
                                 "ms": t, "speedup": base[m] / t,
                                 "frac_copy_bw": (qw0.nbytes() + 2 * m * (n + k)) / t / 1e6
                                 / copy_gbs})
            del qws
    return rows


def training(quick: bool, bf16_tf: float) -> list[dict]:
    rows = []
    for k, n in TRAIN_SHAPES[-1:] if quick else TRAIN_SHAPES:
        wb = torch.randn(n, k, device="cuda").bfloat16() * 0.05
        for m in (4096, 8192):
            x = torch.randn(m, k, device="cuda").bfloat16()
            dy = torch.randn(m, n, device="cuda").bfloat16()
            flop = 2 * m * n * k
            t_f, t_b = ms(lambda: x @ wb.T), ms(lambda: dy @ wb)
            _emit(rows, {"phase": "train", "fmt": "bf16-cublas", "k": k, "n": n, "m": m,
                         "fwd_ms": t_f, "bwd_ms": t_b, "fwd_x": 1.0, "bwd_x": 1.0,
                         "fwd_TFLOPs": flop / t_f / 1e9})
            for fmt, name, kw in variants(k) + [("fp8", "fp8-w8a8", {})]:
                if fmt == "int8":
                    continue
                qw = random_qweight(fmt, n, k, device="cuda", **kw)
                aq = "fp8" if name == "fp8-w8a8" else None
                for exact in (False, True) if fmt == "int4" else (False,):
                    tf = ms(lambda: qmm(x, qw, exact=exact, act_quant=aq))
                    tb = ms(lambda: qmm_t(dy, qw, exact=exact))
                    _emit(rows, {"phase": "train", "fmt": name + ("-exact" if exact else ""),
                                 "k": k, "n": n, "m": m, "fwd_ms": tf, "bwd_ms": tb,
                                 "fwd_x": t_f / tf, "bwd_x": t_b / tb,
                                 "fwd_TFLOPs": flop / tf / 1e9})
                if name == "fp8-w8a8":
                    _emit(rows, scaled_mm_blockwise(x, qw, t_f))
                if fmt in ("int4", "nvfp4"):
                    tf, tb = ms(lambda: _fused(x, qw)), ms(lambda: _fused(dy, qw, True))
                    _emit(rows, {"phase": "train", "fmt": name + "-fused", "k": k, "n": n,
                                 "m": m, "fwd_ms": tf, "bwd_ms": tb, "fwd_x": t_f / tf,
                                 "bwd_x": t_b / tb, "fwd_TFLOPs": flop / tf / 1e9})
    return rows


GEMV_SHAPES = [(576, 1536), (1536, 576), (2048, 2048), (2048, 6144), (6144, 2048),
               (2048, 4096), (4096, 12288)]  # (in, out)
# Alternatives for --gemv-sweep, 4-bit formats: (block_n, block_k, split, warps, stages,
# planes); split 0 = the heuristic's split for the shape; planes False = the tile kernel.
GEMV_ALTS = [(32, 128, 0, 4, 3, False), (16, 256, 0, 4, 3, True), (64, 256, 0, 4, 3, True),
             (32, 128, 0, 4, 3, True), (32, 512, 0, 4, 3, True), (32, 256, 0, 8, 3, True),
             (64, 512, 0, 8, 3, True), (32, 256, 0, 4, 5, True), (128, 256, 0, 8, 3, True),
             (32, 256, 1, 4, 3, True)]

# Second sweep (session 4), around the M = 1 winner (32, 512): narrower / deeper steps,
# pipelining depth, split 2.
GEMV_ALTS_DEEP = [(16, 512, 0, 4, 3, True), (32, 1024, 0, 4, 3, True), (64, 1024, 0, 8, 3, True),
                  (32, 512, 0, 4, 2, True), (32, 512, 0, 4, 4, True), (16, 1024, 0, 4, 3, True),
                  (32, 512, 2, 4, 3, True), (16, 512, 0, 2, 3, True), (32, 512, 0, 2, 3, True)]

# --gemv-small (session 5): the small decode shapes of Qwen3-1.7B (2 MB-6 MB of INT4, a few
# us each, where fixed latency, not bandwidth, dominates): narrow tiles and explicit splits.
GEMV_ALTS_SMALL = [(16, 128, 4, 4, 3, True), (16, 128, 8, 4, 3, True), (32, 128, 4, 4, 3, True),
                   (32, 128, 8, 4, 3, True), (32, 256, 2, 4, 3, True), (32, 256, 4, 4, 3, True),
                   (64, 128, 8, 4, 3, True), (16, 256, 4, 2, 3, True), (32, 128, 16, 4, 2, True),
                   (8, 256, 4, 2, 3, True), (16, 512, 2, 4, 3, True), (16, 256, 8, 4, 3, True)]

# --gemv-wide (session 17): M = 1 plane configs with no split-K on the Qwen3-1.7B shapes
# (no fix-up round trip) and the K work spread over 8 warps per program instead, or narrow
# row tiles for more programs; (bn, bk, split, warps, stages, planes, e2m1, x_prefetch).
GEMV_ALTS_WIDE = [(16, 1024, 1, 8, 2, True, 0, True), (16, 512, 1, 8, 3, True, 0, True),
                  (8, 1024, 1, 8, 2, True, 0, True), (16, 2048, 1, 8, 1, True, 0, True),
                  (32, 1024, 1, 8, 2, True, 0, True), (16, 1024, 2, 8, 2, True, 0, True),
                  (8, 512, 1, 4, 3, True, 0, True), (16, 512, 1, 4, 3, True, 0, True)]

# --gemv-swap: the swap-AB dot kernel (TileConfig.swap: W is the MMA's A operand), (bo, br,
# warps, stages); bm = max(16, M).
SWAP_ALTS = [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 4, 3)]

# --gemv-pairs (session 13; NVFP4 session 14): INT4 / NVFP4 tl.dot tiles (bm = max(16, M)) as
# (bo, br, warps, stages, split), each timed with the format's usual unpack ("fused-tile") and
# over nibble-plane pairs ("fused-pairs", TileConfig.unpack = 3), same run.
PAIR_ALTS = [(32, 128, 4, 4, 1), (32, 128, 4, 4, 4), (32, 128, 4, 3, 8), (64, 128, 4, 4, 1),
             (64, 256, 4, 3, 1), (128, 128, 4, 3, 1)]

# --gemv-regfed (session 14): register-fed plane-pair tiles (one stage, no pipeliner;
# orbit/kernels/plane_dot.py "Register-fed") as (swap, bo, br); each at the K split the rule
# would pick for it (`_qgemm.regfed_split`), at half and at twice that.
REGFED_SHAPES = [(True, 64, 256), (True, 128, 256), (True, 64, 128), (False, 64, 256)]


def regfed_alts(m: int, n: int, k: int, sms: int) -> list:
    """The register-fed tiles --gemv-regfed times at one shape and M."""
    out = []
    bm = max(16, triton.next_power_of_2(m))
    for swap, bo, br in REGFED_SHAPES:
        if not swap and m > 16:
            continue
        steps = triton.cdiv(k, br)
        sp = _qgemm.regfed_split(triton.cdiv(m, bm) * triton.cdiv(n, bo), steps, sms)
        for s_ in sorted({max(1, sp // 2), sp, min(16, sp * 2)}):
            if s_ == 1 or steps >= 2 * s_:
                out.append(_qgemm.TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=1, swap=swap,
                                             split=s_, unpack=_qgemm.UNPACK_PLANE_PAIRS))
    # session 16: the rule's tile (regfed_config) with fewer registers per thread (Nsight
    # Compute, session 15: 136 registers held it to 3 programs per SM), and 64-deep steps
    # (half the decoded operand held in registers) with twice the split
    rule = _qgemm.regfed_config(m, n, k, sms)
    out += [dataclasses.replace(rule, maxnreg=r) for r in REGFED_MAXNREG]
    half = dataclasses.replace(rule, br=64, split=min(16, rule.split * 2))
    out += [half] + [dataclasses.replace(half, maxnreg=r) for r in REGFED_MAXNREG]
    return out


REGFED_MAXNREG = (96, 80, 64)  # 5, 6, 8 programs of 128 threads per SM

# --gemv-mma (session 21): the Gluon INT4 / NVFP4 mma.sync kernel (orbit/kernels/int4_mma.py)
# (rows named int4-mma for both formats) at its
# own pick, at half and twice the pick's split, with the other row tiling, prefetch depth and
# x prefetch; --gemv-mma-sweep: MMA_SWEEP (4 warps: 8 measured the same) at every split;
# --gemv-mma-stages: the pick with and without PDL and the shared-memory ring forms alone.
def _kw_grid(shipped, k: int, group: int, fmt: str, **axes) -> list:
    """The shipped pick (PDL), then every combination of `axes` (MmaConfig field -> values,
    varied in the order given) on it as one program per row tile (split 1), PDL, each once
    and only where the kernel runs it (kw_fits)."""
    from orbit.kernels.int4_mma import kw_fits

    out = [dataclasses.replace(shipped, pdl=True)]
    for values in itertools.product(*axes.values()):
        c = dataclasses.replace(shipped, split=1, pdl=True, **dict(zip(axes, values)))
        if c not in out and kw_fits(c, k, group, fmt):
            out.append(c)
    return out


def mma_alts(m: int, n: int, k: int, group: int, sms: int, sweep: bool = False,
             fmt: str = "int4", stages_only: bool = False, l2_only: bool = False,
             tma_only: bool = False, chains_only: bool = False,
             xsmem_only: bool = False, kw_only: str = "") -> list:
    """The int4_mma configs --gemv-mma times at one shape and M: the pick first, then (sweep)
    every (warps, row tiles, prefetch depth) of MMA_SWEEP at every split the K steps allow,
    or a few neighbours of the pick (stages_only: the ring forms; l2_only: the pick with and
    without MmaConfig.l2, plain and PDL, and l2 at half and twice the pick's split; tma_only:
    the pick plain and PDL, then its TMA ring forms at 2 and 4 steps in flight with 4, 2 and 1
    warps at the pick's split and twice it, plain and PDL; chains_only: the pick with one and
    two MMA chains per step (MmaConfig.chains, INT4), plain and PDL, also with 2 row tiles;
    xsmem_only: the pick with x in registers and staged in shared memory (MmaConfig.x_smem),
    plain and PDL, also at the other row tiling and with two chains where the format has
    them; kw_only: the pick, then warps along K (MmaConfig.kw 2, 4, 8) in place of the
    pick's split (the same warps per tile and K slice, no global fix-up) and on top of it
    (kw times the warps), plain and PDL; kw_only "sweep": the shipped pick's neighbourhood,
    PDL only: warps over N 1 / 2, kw 2 / 4 / 8, prefetch 1 / 2, one or two row tiles, one
    program per tile); kw_only "wide": the shipped pick, then two or four 16-row tiles a
    warp with warps over N 1 / 2, kw 4 / 8, prefetch 1 / 2, with and without the x prefetch,
    PDL (past 8 rows: fewer x loads per weight row); kw_only "deep": the shipped pick with
    prefetch 1 / 2 / 3, 1 / 2 warps over N, and with and without its x prefetch, PDL)."""
    from orbit.kernels.int4_mma import MmaConfig, pick_config, step_depth

    # (the forms below are built on the split-K pick; kw_only and the default list also time
    # the shipped pick, warps along K, first)
    pick = pick_config(m, k, n, group, sms, fmt, warp_k=1)
    shipped = pick_config(m, k, n, group, sms, fmt)
    steps = k // step_depth(fmt, group)
    splits = [s_ for s_ in (1, 2, 4, 8, 16) if steps % s_ == 0 and steps // s_ >= 2]
    if l2_only:
        base = dataclasses.replace(pick, l2=False)
        return ([base, dataclasses.replace(base, l2=True), dataclasses.replace(base, pdl=True),
                 dataclasses.replace(base, pdl=True, l2=True)]
                + [dataclasses.replace(base, split=s_, l2=True, pdl=True)
                   for s_ in (base.split // 2, base.split * 2) if s_ in splits])
    if kw_only == "deep":
        out = [dataclasses.replace(shipped, pdl=True)]
        # (past 8 rows also without the x prefetch, which the sweep never turned off there)
        for wn, pf, xp in itertools.product((1, 2), (1, 2, 3), {shipped.x_prefetch, False}):
            c = dataclasses.replace(shipped, warps=wn, prefetch=pf, x_prefetch=xp, pdl=True)
            if c not in out:
                out.append(c)
        return out
    if kw_only == "wide":
        # (four 16-row tiles a warp: x, which every warp of every program loads from L2 for
        # its K part, is shared by 64 weight rows instead of 32; at M = 16 on 4096x12288 the
        # two-tile pick's x reads are ~50 MB of L2 traffic against 26 MB of weights)
        return _kw_grid(shipped, k, group, fmt, row_tiles=(2, 4), warps=(1, 2), kw=(4, 8),
                        prefetch=(1, 2), x_prefetch={shipped.x_prefetch, False})
    if kw_only == "sweep":
        # (one program per tile: kw on top of a split lost everywhere in session 30)
        return _kw_grid(shipped, k, group, fmt, warps=(1, 2), kw=(2, 4, 8), prefetch=(1, 2),
                        row_tiles=(1, 2))
    if kw_only:
        from orbit.kernels.int4_mma import kw_fits, warps_along_k

        out = [shipped, dataclasses.replace(shipped, pdl=True)] if shipped != pick else []
        out += [pick, dataclasses.replace(pick, pdl=True)]
        for kw in (2, 4, 8):
            for sp in sorted({max(1, pick.split // kw), pick.split}):
                c = warps_along_k(pick, kw, sp)
                if kw_fits(c, k, group, fmt):
                    out += [c, dataclasses.replace(c, pdl=True)]
        return out
    if xsmem_only:
        from orbit.kernels.int4_mma import chains_fit, x_smem_fits

        out = []
        # (the other row tiling at the pick's split too: one row tile held 26% fewer
        # instructions per step staged at M = 16 offline, 96 registers against 128)
        for c in ((pick, dataclasses.replace(pick, row_tiles=3 - pick.row_tiles))
                  + ((dataclasses.replace(pick, chains=2),) if chains_fit(fmt, group) else ())):
            out += [dataclasses.replace(c, x_smem=xs, pdl=p_) for xs in (False, True)
                    for p_ in (False, True) if not xs or x_smem_fits(m, k // c.split)]
        return out
    if chains_only:
        out = []
        for c in (pick, dataclasses.replace(pick, row_tiles=3 - pick.row_tiles)):
            out += [dataclasses.replace(c, chains=ch, pdl=p_) for ch in (1, 2)
                    for p_ in (False, True)]
        return out
    if tma_only:
        # (session 28's first run: 2-4 steps at the pick's split were best of 2-8 steps at
        # 1/4-1x of it; so 2 and 4 steps at 1-2x the split, with 4, 2 and 1 warps: at 1 warp
        # a program's CTA barriers around the ring are one warp's)
        base = dataclasses.replace(pick, tma=0)
        out = [base, dataclasses.replace(base, pdl=True)]
        for w in (4, 2, 1):
            for sp in (base.split, base.split * 2):
                if sp not in splits:
                    continue
                out += [dataclasses.replace(base, warps=w, split=sp, tma=min(st, steps // sp),
                                            pdl=p_)
                        for st in (2, 4) for p_ in (False, True)]
        return out
    if sweep:
        return [pick] + [MmaConfig(w, rt, s_, d, xp) for w, rt, d, xp in MMA_SWEEP
                         for s_ in splits if MmaConfig(w, rt, s_, d, xp) != pick]
    out = [pick] + ([shipped] if shipped != pick else [])
    if not stages_only:
        out += [dataclasses.replace(pick, prefetch=2 if pick.prefetch < 2 else 1),
                dataclasses.replace(pick, x_prefetch=not pick.x_prefetch),
                dataclasses.replace(pick, row_tiles=3 - pick.row_tiles)]
        out += [dataclasses.replace(pick, split=s_) for s_ in (pick.split // 2, pick.split * 2)
                if s_ in splits]
    # the cp.async shared-memory ring (MmaConfig.stages) at the pick's split and at longer
    # slices: up to the slice's steps in flight per program, not held in registers
    for sp in sorted({pick.split, max(1, pick.split // 2), max(1, pick.split // 4)}):
        depth = steps // sp
        out += [dataclasses.replace(pick, split=sp, stages=st) for st in (2, 4, 8)
                if st <= depth and sp in splits + [1]]
    # (rows int4-mma-pdl) the pick and its two-steps-ahead form with programmatic dependent
    # launch between the graphed calls: what an engine step's decode chain gets
    out += [dataclasses.replace(pick, pdl=True)]
    if not stages_only:
        out += [dataclasses.replace(pick, pdl=True, prefetch=2 if pick.prefetch < 2 else 1)]
    return out


MMA_SWEEP = [(4, rt, d, xp) for rt in (1, 2) for d in (1, 2) for xp in (False, True)]


def _mma(x, qw, cfg):
    """int4_mma on `qw`'s packed codes and scales (INT4 or NVFP4)."""
    from orbit.kernels.int4_mma import int4_mma_weight

    return int4_mma_weight(x, qw, cfg)


def mma_error(x, qw, cfg, ref) -> float:
    """Relative norm error of int4_mma against `ref` = x @ dequantize(W)^T in fp64: a wrong
    kernel cannot post a time (its row records the error)."""
    return ((_mma(x, qw, cfg).double() - ref).norm() / ref.norm()).item()


# --gemv-xpre (session 6): around the shipped M = 1 plane config with the x prefetch: more
# programs (split 2, 16 rows), more warps, shallower steps (8th field: x_prefetch).
GEMV_ALTS_XPRE = [(32, 512, 2, 4, 3, True, False, True), (16, 512, 0, 4, 3, True, False, True),
                  (32, 256, 0, 4, 3, True, False, True), (32, 512, 0, 8, 3, True, False, True),
                  (64, 512, 0, 8, 3, True, False, True), (32, 512, 0, 4, 4, True, False, True),
                  (16, 256, 0, 2, 3, True, False, True), (32, 1024, 0, 4, 2, True, False, True)]


# --gemv-fp4 (session 15): M = 1 plane configs around the shipped ones (NVFP4: 16 rows, 2 warps,
# 256 deep; INT4: 32 rows, 4 warps, 512 deep), each format with its shipped decode (7th field
# -1: the pick's GemvConfig.e2m1, 2 for NVFP4, 0 for INT4) and the x prefetch: narrower tiles, fewer
# warps, deeper/shallower steps, pipeline depth.
GEMV_ALTS_FP4 = [(16, 256, 0, 2, 3, True, -1, True), (16, 512, 0, 2, 3, True, -1, True),
                 (16, 256, 0, 2, 4, True, -1, True), (16, 256, 0, 2, 2, True, -1, True),
                 (8, 256, 0, 1, 3, True, -1, True), (8, 256, 0, 2, 3, True, -1, True),
                 (16, 256, 0, 4, 3, True, -1, True), (32, 256, 0, 4, 3, True, -1, True),
                 (32, 512, 0, 4, 3, True, -1, True), (16, 128, 0, 2, 4, True, -1, True),
                 (32, 256, 0, 2, 3, True, -1, True), (8, 512, 0, 1, 3, True, -1, True),
                 (16, 512, 0, 1, 3, True, -1, True), (8, 128, 0, 1, 4, True, -1, True)]


# FP8 at M <= FP8_GEMV_MAX_M (orbit/kernels/gemv_fp8.py, session 8), timed with --gemv-sweep: (block_n,
# block_k, split, warps, stages, dec, x_prefetch); split 0 = the heuristic's.
FP8_ALTS = [(32, 256, 0, 4, 3, 0, True), (32, 128, 0, 4, 3, 1, True), (16, 256, 0, 4, 3, 1, True),
            (32, 512, 0, 4, 3, 1, True), (64, 256, 0, 8, 3, 1, True), (32, 256, 0, 4, 4, 1, True),
            (32, 256, 0, 4, 3, 1, False), (16, 256, 0, 2, 3, 1, True), (64, 128, 0, 4, 3, 1, True),
            (16, 128, 0, 4, 3, 0, True), (32, 128, 0, 4, 3, 0, True)]


def _alt_e2m1(eb: list, shipped: int) -> int:
    """GemvConfig.e2m1 of a sweep entry's 7th field: -1 the shipped pick's (`shipped`), else
    as given (True = 1); 0 without the field."""
    if not eb:
        return 0
    return shipped if eb[0] == -1 else int(eb[0])


def _gemv(x, qw, config=None):
    """The GEMV kernel itself (whatever _qgemm.GEMV_MAX_M is)."""
    from orbit.kernels.gemv import gemv
    from orbit.kernels.random_weights import gemv_operands

    y = torch.empty((x.shape[0], qw.shape[0]), device=x.device, dtype=x.dtype)
    return gemv(x, *gemv_operands(qw), y, config)


def keep_paths(plan: list[tuple[str, object]], patterns: tuple[str, ...]) -> list:
    """The (path, config) entries whose path matches one of the fnmatch `patterns`."""
    from fnmatch import fnmatchcase

    return [(p, c) for p, c in plan if any(fnmatchcase(p, pat.strip()) for pat in patterns)]


def decode_gemv(quick: bool, copy_gbs: float, alts: bool, shapes: list | None = None,
                ms_: tuple = (1, 4, 16), alt_list: list | None = None,
                swap: bool = False, formats: tuple = ("int4", "fp8", "nvfp4"),
                decodes: bool = False, pairs: bool = False, regfed: bool = False,
                paths: tuple[str, ...] = ("*",), mma: bool = False,
                mma_sweep: bool = False, mma_stages: bool = False,
                mma_l2: bool = False, mma_tma: bool = False,
                mma_chains: bool = False, mma_xsmem: bool = False,
                mma_kw: str = "") -> list[dict]:
    """Old fused tl.dot kernel vs the GEMV path vs cuBLAS BF16 at decode M, one run; only the
    paths whose names match one of the `paths` patterns (fnmatch: "gemv", "gemv-pdl*") are
    timed (cuBLAS always is: it is every row's baseline)."""

    from orbit.kernels.gemv import FP8_GEMV_MAX_M, GemvConfig, num_sms, pick_gemv_config
    from orbit.kernels.gemv_fp8 import Fp8GemvConfig, pick_fp8_gemv_config

    rows = []
    alt_list = alt_list or GEMV_ALTS
    for k, n in shapes or (GEMV_SHAPES[-5:] if quick else GEMV_SHAPES):
        t_bf = bf16_baseline(rows, "gemv", "bf16", k, n, ms_, copy_gbs)
        for fmt, name, kw in [v for v in variants(k) if v[0] in formats]:
            qw0 = random_qweight(fmt, n, k, device="cuda", **kw)
            nq = copies_for(qw0.nbytes())
            qws = [random_qweight(fmt, n, k, seed=i, device="cuda", **kw) for i in range(nq)]
            for m in ms_:
                x = torch.randn(m, k, device="cuda").bfloat16()
                auto = pick_gemv_config(m, n, k, fmt, num_sms(x.device))
                plan = [("fused-dot", None), ("gemv", None)]
                if fmt == "fp8" and m <= FP8_GEMV_MAX_M:  # same-run baseline: the tile GEMV
                    plan.append(("gemv-v1", auto))
                    auto = pick_fp8_gemv_config(m, n, k, num_sms(x.device))
                    if alts:
                        plan += [("gemv-fp8", Fp8GemvConfig(bn, bk, sp or auto.split, w, st, d, xp))
                                 for bn, bk, sp, w, st, d, xp in FP8_ALTS]
                if isinstance(auto, GemvConfig) and auto.split > 1:  # same-run baseline:
                    # split-K reduced by a second launch
                    plan.append(("gemv-2launch", dataclasses.replace(auto, fixup=False)))
                if getattr(auto, "planes", False) and m == 1:  # same-run baselines of the session-6 changes:
                    # session 5's kernel (per-step reduction, shift-and-extract decode), then
                    # the deferred reduction without the x prefetch
                    plan.append(("gemv-s5", dataclasses.replace(auto, defer=False,
                                                                x_prefetch=False)))
                    plan.append(("gemv-noxpre", dataclasses.replace(auto, x_prefetch=False)))
                pdls = (False, True) if m == 1 else (False,)
                if decodes and fmt == "nvfp4" and getattr(auto, "planes", False):
                    # the shipped config with the other E2M1 decodes (GemvConfig.e2m1), with
                    # and without PDL: 1 fp32 bits + select, 2 fp32 bits with the scale folded
                    plan += [(f"gemv-e2m1-{e}{'-pdl' if p else ''}",
                              dataclasses.replace(auto, e2m1=e, pdl=p))
                             for e in (1, 2) for p in pdls]
                if decodes and 1 < m <= 4 and fmt in ("int4", "nvfp4") and auto.planes:
                    # the deferred reduction past M = 1 (narrow row tiles keep its [rows, M,
                    # K-step] accumulator in registers), NVFP4 with the fp32-bit decode
                    plan += [(f"gemv-defer{bn}", dataclasses.replace(
                        auto, block_n=bn, defer=True, x_prefetch=True,
                        e2m1=2 if fmt == "nvfp4" else 0))
                        for bn in (8, 16)]
                if m == 1:  # programmatic dependent launch between the graphed calls
                    plan.append(("gemv-pdl", dataclasses.replace(auto, pdl=True)))
                    plan.append(("gemv-pdl-l2", dataclasses.replace(auto, pdl=True,
                                                                    l2_prefetch=True)))
                    # the same weights every call (L2-resident where they fit in it): what a
                    # prefetch of the next kernel's weights into L2 could reach at best
                    plan.append(("gemv-hot", auto))
                if swap:
                    bm = max(16, triton.next_power_of_2(m))
                    plan += [("fused-swap", _qgemm.TileConfig(bm=bm, bo=bo, br=br, warps=w,
                                                              stages=st, swap=True))
                             for bo, br, w, st in SWAP_ALTS]
                if pairs and fmt in ("int4", "nvfp4"):
                    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS

                    bm = max(16, triton.next_power_of_2(m))
                    for bo, br, w, st, sp in PAIR_ALTS:
                        c = _qgemm.TileConfig(bm=bm, bo=bo, br=br, warps=w, stages=st, split=sp)
                        plan += [("fused-tile", c),
                                 ("fused-pairs", dataclasses.replace(c, unpack=UNPACK_PLANE_PAIRS))]
                if regfed and fmt in ("int4", "nvfp4"):
                    plan += [(f"regfed-{'swap' if c.swap else 'mma'}", c)
                             for c in regfed_alts(m, n, k, num_sms(x.device))]
                    # same-run baseline: a pipelined (4-stage) pairs tile
                    plan.append(("fused-pairs", _qgemm.TileConfig(
                        bm=max(16, triton.next_power_of_2(m)), bo=32, br=128, warps=4, stages=4,
                        unpack=_qgemm.UNPACK_PLANE_PAIRS)))
                if mma:  # (mma_operands_ok: the formats and operands int4_mma takes)
                    from orbit.kernels.dispatch import mma_operands_ok
                    from orbit.kernels.int4_mma import weight_operands

                    if mma_operands_ok(x, qw0):
                        plan += [("int4-mma-pdl" if c.pdl else "int4-mma", c) for c in mma_alts(
                            m, n, k, weight_operands(qw0)[2], num_sms(x.device), mma_sweep,
                            fmt, mma_stages, mma_l2, mma_tma, mma_chains, mma_xsmem, mma_kw)]
                if alts and fmt in ("int4", "nvfp4", "mxfp4"):
                    plan += [("gemv-alt", GemvConfig(bn, bk, sp or auto.split, w, st, planes=pl,
                                                     e2m1=_alt_e2m1(eb, auto.e2m1),
                                                     defer=m == 1,
                                                     x_prefetch=len(eb) > 1 and eb[1]))
                             for bn, bk, sp, w, st, pl, *eb in alt_list
                             if not (eb and eb[0] > 0 and fmt != "nvfp4")]
                plan = keep_paths(plan, paths)
                mma_ref = None  # x @ W^T in fp64 for the int4-mma rows' check, made once
                for path, cfg in plan:
                    if path == "fused-dot":
                        fns = [lambda q=q: _fused(x, q) for q in qws]
                    elif path in ("fused-swap", "fused-tile", "fused-pairs") or path.startswith(
                            "regfed-"):
                        fns = [lambda q=q: _fused(x, q, config=cfg) for q in qws]
                    elif path.startswith("int4-mma"):
                        fns = [lambda q=q: _mma(x, q, cfg) for q in qws]
                    elif path == "gemv-hot":
                        fns = [lambda q0=qws[0]: _gemv(x, q0, cfg)] * len(qws)
                    else:
                        fns = [lambda q=q: _gemv(x, q, cfg) for q in qws]
                    row = {"phase": "gemv", "fmt": name, "path": path, "k": k, "n": n, "m": m,
                           "cfg": list((cfg or auto).__dict__.values()) if path != "fused-dot"
                           else None}
                    try:
                        if path.startswith("int4-mma"):
                            if mma_ref is None:
                                mma_ref = x.double() @ qws[0].dequantize().double().T
                            row["rel_err"] = mma_error(x, qws[0], cfg, mma_ref)
                            if not row["rel_err"] < 1e-2:
                                raise RuntimeError(f"int4_mma wrong: rel err {row['rel_err']}")
                        t = ms_rotated(fns)
                    except Exception as e:  # noqa: BLE001  (out of resources etc.: recorded)
                        _emit(rows, {**row, "error": repr(e)[:160], "ms": float("nan"),
                                     "speedup": float("nan"), "GBps": float("nan"),
                                     "frac_copy_bw": float("nan")})
                        continue
                    gbs = (qw0.nbytes() + 2 * m * (n + k)) / t / 1e6
                    _emit(rows, {**row, "ms": t, "speedup": t_bf[m] / t, "GBps": gbs,
                                 "frac_copy_bw": gbs / copy_gbs, "copies": nq})
            del qws
    return rows


def scaled_mm_blockwise(x, qw, t_bf16: float) -> dict:
    """Experiment for the next version: cuBLAS's own 1x128 / 128x128 block-scaled FP8 GEMM via
    torch._scaled_mm, fed by our activation quantization. Recorded, not used by qmm."""
    from orbit.kernels.fp8 import act_quant_fp8, w8a8_gemm

    xq, sx = act_quant_fp8(x)
    w, sw = qw.tensors["weight"], qw.tensors["scale_inv"]
    ref = w8a8_gemm(xq, sx, qw, torch.bfloat16).double()
    row = {"phase": "train", "fmt": "fp8-w8a8-scaled_mm", "k": x.shape[1], "n": w.shape[0],
           "m": x.shape[0]}
    try:
        sa = sx.t().contiguous().t()  # [M, K/128], M-major
        fn = lambda: torch._scaled_mm(xq, w.t(), scale_a=sa, scale_b=sw.t(),  # noqa: E731
                                      out_dtype=torch.bfloat16)
        y = fn()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        aq = ms(lambda: act_quant_fp8(x))
        t = ms(fn)
        row.update({"fwd_ms": t + aq, "gemm_ms": t, "rel_err_vs_triton": err,
                    "fwd_x": t_bf16 / (t + aq), "bwd_ms": float("nan"), "bwd_x": float("nan")})
    except Exception as e:  # noqa: BLE001  (unsupported on this build: recorded in the row)
        row.update({"error": repr(e)[:300], "fwd_ms": float("nan"), "fwd_x": float("nan"),
                    "bwd_ms": float("nan"), "bwd_x": float("nan")})
    return row


def _fused(x, qw, transpose=False, config=None):
    """The fused kernel even where fast mode would dequantize + cuBLAS (large M)."""
    t = qw.tensors
    q = t.get("qweight", t.get("weight"))
    s = t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if qw.fmt == "nvfp4" else None
    grp = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(qw.fmt, qw.group_size)
    out_dim = qw.shape[1] if transpose else qw.shape[0]
    cfg = config or _qgemm.pick_config(x.shape[0], out_dim, qw.fmt, False)
    return _qgemm.launch(x, qw.fmt, qw.shape, q, s, t.get("offset"), gs, grp, transpose,
                         False, config=cfg)


def sweep() -> list[dict]:
    """Tile configs and unpack variants tried against the built-in pick, for the heuristics."""
    from orbit.kernels.fp8 import act_quant_fp8, w8a8_gemm

    TC = _qgemm.TileConfig
    dec = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3), (16, 64, 64, 4, 4)]
    trn = [(128, 128, 64, 4, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]
    rows = []
    for fmt, kw in [("int4", {"group_size": 128}), ("nvfp4", {}), ("mxfp4", {})]:
        for k, n in [(4096, 12288), (2048, 6144)]:
            qw = random_qweight(fmt, n, k, device="cuda", **kw)
            for unpack in (0, 1, 2):
                plan = [("decode", m, c, False) for m in (1, 16) for c in dec]
                if unpack and k == 4096:
                    plan += [("train", 8192, c, tr) for c in trn for tr in (False, True)]
                for phase, m, c, tr in plan:
                    cfg = TC(*c, unpack=unpack)
                    x = torch.randn(m, n if tr else k, device="cuda").bfloat16()
                    try:
                        tm = ms(lambda: _fused(x, qw, tr, cfg))
                    except Exception as e:  # noqa: BLE001  (out of resources etc.: recorded, run goes on)
                        _emit(rows, {"fmt": fmt, "k": k, "n": n, "m": m, "bwd": tr,
                                     "cfg": c, "unpack": unpack, "error": repr(e)[:160]})
                        continue
                    _emit(rows, {"fmt": fmt, "k": k, "n": n, "m": m, "bwd": tr, "cfg": c,
                                 "unpack": unpack, "ms": tm})
    for k, n in [(4096, 12288), (2048, 6144)]:
        qw = random_qweight("fp8", n, k, device="cuda")
        x = torch.randn(8192, k, device="cuda").bfloat16()
        xq, sx = act_quant_fp8(x)
        _emit(rows, {"fmt": "act_quant", "k": k, "m": 8192, "ms": ms(lambda: act_quant_fp8(x))})
        for tiles in [(128, 128, 8, 3), (128, 128, 4, 3), (128, 256, 8, 3), (256, 128, 8, 3),
                      (128, 128, 8, 4), (64, 256, 4, 3)]:
            try:
                tm = ms(lambda: w8a8_gemm(xq, sx, qw, torch.bfloat16, tiles=tiles))
            except Exception as e:  # noqa: BLE001  (recorded in the row)
                _emit(rows, {"fmt": "w8a8", "k": k, "n": n, "tiles": tiles, "error": repr(e)[:160]})
                continue
            _emit(rows, {"fmt": "w8a8", "k": k, "n": n, "m": 8192, "tiles": tiles, "ms": tm})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="largest shapes only")
    ap.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    ap.add_argument("--only-sweep", action="store_true", help="time the alternatives only")
    ap.add_argument("--gemv", action="store_true",
                    help="only the decode GEMV vs fused tl.dot vs cuBLAS comparison")
    ap.add_argument("--gemv-sweep", action="store_true", help="with --gemv: time GEMV_ALTS too")
    ap.add_argument("--gemv-shapes", default="", help="with --gemv: only these in x out, e.g. 4096x12288")
    ap.add_argument("--gemv-m", default="1,4,16", help="with --gemv: these M")
    ap.add_argument("--gemv-formats", default="int4,fp8,nvfp4", help="with --gemv: these formats")
    ap.add_argument("--gemv-paths", default="*",
                    help="with --gemv: time only the paths matching these comma-separated "
                         "fnmatch patterns (e.g. 'gemv,fused-dot' or 'gemv-pdl*'), so that a "
                         "short device call reaches every shape")
    ap.add_argument("--gemv-deep", action="store_true",
                    help="with --gemv-sweep: the deeper-step alternatives GEMV_ALTS_DEEP")
    ap.add_argument("--gemv-small", action="store_true",
                    help="with --gemv-sweep: the small-shape alternatives GEMV_ALTS_SMALL")
    ap.add_argument("--gemv-wide", action="store_true",
                    help="with --gemv-sweep: unsplit 8-warp / narrow-tile M = 1 plane configs "
                         "(GEMV_ALTS_WIDE)")
    ap.add_argument("--gemv-swap", action="store_true",
                    help="with --gemv: also time the swap-AB dot kernel configs SWAP_ALTS")
    ap.add_argument("--gemv-fp4", action="store_true",
                    help="with --gemv-sweep: M = 1 plane configs (narrow tiles, few warps) with "
                         "each format's shipped decode (GEMV_ALTS_FP4)")
    ap.add_argument("--gemv-xpre", action="store_true",
                    help="with --gemv-sweep: plane configs with the x prefetch (GEMV_ALTS_XPRE)")
    ap.add_argument("--gemv-pairs", action="store_true",
                    help="with --gemv: INT4 / NVFP4 tl.dot tiles PAIR_ALTS with the usual unpack "
                         "and over nibble-plane pairs (TileConfig.unpack = 3), same run")
    ap.add_argument("--gemv-regfed", action="store_true",
                    help="with --gemv: INT4 / NVFP4 register-fed plane-pair tiles (one stage; "
                         "regfed_alts) and a 4-stage pairs tile, same run")
    ap.add_argument("--gemv-mma", action="store_true",
                    help="with --gemv: the Gluon INT4 / NVFP4 mma.sync kernel (int4_mma, mma_alts), each "
                         "config checked against the fp64 reference before it is timed")
    ap.add_argument("--gemv-mma-sweep", action="store_true",
                    help="with --gemv-mma: every MMA_SWEEP config at every split")
    ap.add_argument("--gemv-mma-stages", action="store_true",
                    help="with --gemv-mma: only the pick (with and without PDL) and its "
                         "shared-memory ring forms (MmaConfig.stages)")
    ap.add_argument("--gemv-mma-l2", action="store_true",
                    help="with --gemv-mma: only the pick with and without MmaConfig.l2 (the K "
                         "slice bulk-prefetched into L2 first), plain and PDL, and l2 at half "
                         "and twice the pick's split")
    ap.add_argument("--gemv-mma-tma", action="store_true",
                    help="with --gemv-mma: only the pick (plain and PDL) and its TMA ring forms "
                         "(MmaConfig.tma, 2 and 4 steps; 4, 2, 1 warps; 1-2x its split)")
    ap.add_argument("--gemv-mma-xsmem", action="store_true",
                    help="with --gemv-mma: only the pick with x in registers and staged in "
                         "shared memory (MmaConfig.x_smem), plain and PDL, 1 and 2 chains")
    ap.add_argument("--gemv-mma-chains", action="store_true",
                    help="with --gemv-mma: only the pick with 1 and 2 MMA chains per step "
                         "(MmaConfig.chains, INT4 and NVFP4), 1 and 2 row tiles, plain and PDL")
    ap.add_argument("--gemv-mma-kw", nargs="?", const="forms", default="",
                    choices=["forms", "sweep", "deep", "wide"],
                    help="with --gemv-mma: only the pick and its warps-along-K forms "
                         "(MmaConfig.kw 2, 4, 8 in place of and on top of its split), plain "
                         "and PDL; 'sweep': the shipped pick's neighbourhood (warps over N, "
                         "kw, prefetch depth, row tiles), PDL only; 'deep': the shipped pick "
                         "with 1, 2 and 3 steps loaded ahead, 1 and 2 warps over N, PDL; "
                         "'wide': two or four 16-row tiles a warp, kw 4 / 8, PDL")
    ap.add_argument("--gemv-decodes", action="store_true",
                    help="with --gemv: the shipped configs with the other nibble decodes: "
                         "NVFP4 GemvConfig.e2m1 = 1, 2; M = 2-4 the deferred reduction")
    ap.add_argument("--mid", action="store_true",
                    help="only rollout batch sizes (MID_M rows, Qwen3-1.7B shapes): the tl.dot "
                         "loop vs dequantize + cuBLAS vs cuBLAS BF16, to place _qgemm.dequant_min_m")
    ap.add_argument("--mid-m", default=",".join(map(str, MID_M)), help="with --mid: these M")
    ap.add_argument("--knob", default=None,
                    help="MODULE.NAME=V: set one module constant for the whole run (e.g. "
                         "\"orbit.kernels.gemv.PLANES_M1_UNSPLIT_FORMATS=('int4','nvfp4')\"); "
                         "scripts/bench/knobs.py")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    args = ap.parse_args()
    if args.knob:
        from knobs import fixed_knob, set_knob  # (scripts/bench: the script's own directory)

        set_knob(fixed_knob(args.knob, "bench_qmm.py --knob"))
    torch.manual_seed(0)
    ceil = ceilings()
    res = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "command": " ".join(sys.argv), "knob": args.knob,
           **ceil}
    if args.mid:
        res["mid"] = mid_decode(ceil["copy_GBps"], tuple(args.gemv_formats.split(",")),
                                tuple(int(v) for v in args.mid_m.split(",")))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_qmm.json").write_text(json.dumps(res, indent=1))
        print(f"\n{res['device']}  copy {ceil['copy_GBps']:.0f} GB/s")
        print(f"{'in x out':>12}{'M':>5} {'fmt':<12}{'path':<16}{'us':>9}{'xBF16':>7}")
        for r in res["mid"]:
            print(f"{r['k']:>5}x{r['n']:<6}{r['m']:>5} {r['fmt']:<12}{r['path']:<16}"
                  f"{r['ms']*1e3:9.1f}{r['speedup']:7.2f}")
        return
    if args.gemv:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.gemv_shapes.split(",") if sh]
        res["gemv"] = decode_gemv(args.quick, ceil["copy_GBps"], args.gemv_sweep, shapes or None,
                                  tuple(int(v) for v in args.gemv_m.split(",")),
                                  GEMV_ALTS_FP4 if args.gemv_fp4 else
                                  GEMV_ALTS_XPRE if args.gemv_xpre else
                                  GEMV_ALTS_SMALL if args.gemv_small else
                                  GEMV_ALTS_WIDE if args.gemv_wide else
                                  GEMV_ALTS_DEEP if args.gemv_deep else None, args.gemv_swap,
                                  tuple(args.gemv_formats.split(",")), args.gemv_decodes,
                                  args.gemv_pairs, args.gemv_regfed,
                                  tuple(args.gemv_paths.split(",")), args.gemv_mma,
                                  args.gemv_mma_sweep, args.gemv_mma_stages,
                                  args.gemv_mma_l2, args.gemv_mma_tma,
                                  args.gemv_mma_chains, args.gemv_mma_xsmem, args.gemv_mma_kw)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_qmm.json").write_text(json.dumps(res, indent=1))
        print(f"\n{res['device']}  copy {ceil['copy_GBps']:.0f} GB/s")
        print(f"{'in x out':>12}{'M':>4} {'fmt':<11}{'path':<16}{'us':>8}{'xBF16':>7}{'GB/s':>7}"
              f"{'%copy':>6}  cfg")
        for r in res["gemv"]:
            print(f"{r['k']:>5}x{r['n']:<6}{r['m']:>4} {r['fmt']:<11}{r['path']:<16}"
                  f"{r['ms']*1e3:8.1f}{r['speedup']:7.2f}{r['GBps']:7.0f}"
                  f"{100*r['frac_copy_bw']:6.0f}  {r.get('cfg') or ''}")
        return
    if args.sweep or args.only_sweep:
        res["sweep"] = sweep()
    res["decode"] = [] if args.only_sweep else decode(args.quick, ceil["copy_GBps"])
    res["train"] = [] if args.only_sweep else training(args.quick, ceil["bf16_TFLOPs"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_qmm.json").write_text(json.dumps(res, indent=1))
    print(f"\n{res['device']}  copy {ceil['copy_GBps']:.0f} GB/s  bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s")
    print(f"{'decode':8}{'in x out':>12}{'M':>4} {'fmt':<18}{'us':>8}{'xBF16':>7}{'GB/s':>7}")
    for r in res["decode"]:
        print(f"{'':8}{r['k']:>5}x{r['n']:<6}{r['m']:>4} {r['fmt']:<18}{r['ms']*1e3:8.1f}"
              f"{r['speedup']:7.2f}{r['GBps']:7.0f}")
    print(f"{'train':8}{'in x out':>12}{'M':>5} {'fmt':<17}{'fwd ms':>8}{'xBF16':>7}{'bwd ms':>8}{'xBF16':>7}")
    for r in res["train"]:
        print(f"{'':8}{r['k']:>5}x{r['n']:<6}{r['m']:>5} {r['fmt']:<17}{r['fwd_ms']:8.3f}"
              f"{r['fwd_x']:7.2f}{r['bwd_ms']:8.3f}{r['bwd_x']:7.2f}")


if __name__ == "__main__":
    main()
