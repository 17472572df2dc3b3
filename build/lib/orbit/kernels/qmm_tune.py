"""Measure which kernel should run each fast-mode quantized matmul on this GPU and write the
route table that `_qgemm.route` reads (orbit/kernels/qmm_routes.py).

For every format, weight shape the model runs (`model_shapes`) and row count M of a bucket
list, the candidates are: the rules' route (what runs without a table), dequantize + cuBLAS,
the decode GEMV (M <= _qgemm.GEMV_MAX_M) and the `tl.dot` loop over a grid of tiles
(`dot_configs`; up to 64 rows also the swapped loop, `swap_configs`; for INT4 and NVFP4 the
same tiles over nibble-plane pairs, and the register-fed swapped pairs with their K splits,
`register_fed_configs`). Each candidate is first checked against the reference
(dequantize, matmul: relative error within BF16 accumulation), then timed as an engine step runs it: calls over
enough weight copies to miss L2, captured and replayed as one CUDA graph (`graph_timer`).
The fastest wins only if it beats the rules' route by `min_gain`; otherwise the entry keeps
the rules' route, so noise never changes a shape's kernel (and its bits) for nothing.

The timing is injected (`Timer`), so the search, the checks and the table it writes are
tested on the CPU under Triton's interpreter with a deterministic timer; the GPU timer is what
`python -m orbit tune-qmm` runs. Nothing here runs at training or rollout time.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from orbit.kernels import _qgemm
from orbit.kernels.qmm_routes import ROUTES, Route, RouteTable, device_name
from orbit.kernels.tile_config import PLANE_PAIR_FORMATS, UNPACK_PLANE_PAIRS, TileConfig
from orbit.models.config import ModelConfig
from orbit.quant.qweight import QuantizedWeight

DEFAULT_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A candidate's output against the reference: relative Frobenius error. BF16 outputs of an
# fp32-accumulated dot product differ from the reference by summation order and one rounding
# (~2^-8 relative per element at worst, far less in norm).
MAX_REL_ERR = 1e-2
SPLIT_FROM_BEST = 3  # unsplit tl.dot tiles whose split-K variants the second round tries

Timer = Callable[[list[Callable[[], Any]]], float]  # closures -> seconds per call


@dataclass(frozen=True)
class Measured:
    """One timed candidate (seconds per call), or why it was not timed."""

    route: Route
    seconds: float | None
    note: str = ""


@dataclass
class ShapeResult:
    fmt: str
    n: int
    k: int
    m: int
    rules: Measured
    best: Measured
    chosen: Route
    candidates: list[Measured]
    weight_bytes: int


def describe(route: Route) -> str:
    if route.kind != "dot" or route.config is None:
        return route.kind
    c = route.config
    return f"dot {c.bm}x{c.bo}x{c.br} w{c.warps} s{c.stages}" + (
        f" k/{c.split}" if c.split > 1 else "") + (" swap" if c.swap else "") + (
        " pairs" if c.unpack == UNPACK_PLANE_PAIRS else "")


def model_shapes(config: ModelConfig, sibling_max_m: int | None = None) -> list[tuple[int, int, int]]:
    """(n, k, max rows) of every quantized linear call a forward of this model makes through
    `_qgemm.launch`: each projection alone at any M, and the stacked sibling weights (q/k/v,
    gate/up; orbit/quant/siblings.py) at decode sizes (`sibling_max_m` rows, if given), else
    at any M where the groups also serve the dequantize rows. MoE experts run the grouped MoE
    kernel, not this one, so only their layers' attention projections count."""
    from orbit.quant.linear import SIBLING_FROM_DEQUANT, SIBLING_MAX_M

    smax = SIBLING_MAX_M if sibling_max_m is None else sibling_max_m
    c = config
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    big = 1 << 30
    out: dict[tuple[int, int], int] = {}

    def add(n: int, k: int, max_m: int) -> None:
        out[(n, k)] = max(out.get((n, k), 0), max_m)

    for n in (q, kv):
        add(n, h, big)
    add(h, q, big)
    # the stacked weights run at decode rows and, with linear.SIBLING_FROM_DEQUANT, again from
    # the rows where the rules dequantize (format-dependent): timed at every M then (a route at
    # rows the groups do not serve is never looked up)
    stacked = big if SIBLING_FROM_DEQUANT and sibling_max_m is None else smax
    add(q + 2 * kv, h, stacked)
    if any(not c.is_moe_layer(i) for i in range(c.num_layers)):
        i = c.intermediate_size
        add(i, h, big)
        add(h, i, big)
        add(2 * i, h, stacked)
    return [(n, k, mm) for (n, k), mm in sorted(out.items())]


def dot_configs(m: int, fmt: str, grid: str = "quick") -> list[TileConfig]:
    """`tl.dot` tiles to try at m rows. quick: the row tile that covers m (from 32 rows also
    the next smaller), 32-128 output columns, 64/128 deep, 4 warps (8 for big tiles), 3-4
    stages;
    full adds 256-wide output tiles, 8 warps everywhere and 2-stage pipelines. (Split-K
    variants: `split_variants`, tried on the fastest of these.)"""
    bm0 = min(128, max(16, 1 << max(0, math.ceil(math.log2(max(1, m))))))
    # a half-height row tile (each weight tile decoded twice as often) only where it can
    # buy back occupancy: from 32 rows on
    bms = sorted({bm0, max(16, bm0 // 2)} if m >= 32 or grid == "full" else {bm0})
    bos = (32, 64, 128) + ((256,) if grid == "full" else ())
    brs = (64, 128)
    stages = (3, 4) + ((2,) if grid == "full" else ())
    out = []
    for bm in bms:
        for bo in bos:
            for br in brs:
                if fmt == "fp8" and br > 128:  # fp8_tile: one 128-column scale block per step
                    continue
                smem = (bm * br * 2 + bo * br * 2) * max(stages)
                if smem > 200 * 1024 or bm * bo > 128 * 256:
                    continue
                warps = (4, 8) if grid == "full" or bm * bo >= 128 * 128 else (4,)
                out += [TileConfig(bm=bm, bo=bo, br=br, warps=w, stages=s)
                        for w in warps for s in stages]
    if fmt in PLANE_PAIR_FORMATS and m <= PAIRS_MAX_M:  # the same tiles over plane pairs
        out += [replace(c, unpack=UNPACK_PLANE_PAIRS) for c in out if c.br % 64 == 0]
    if m <= SWAP_MAX_M:
        out += swap_configs(m, fmt, grid)
    return out


# INT4 and NVFP4 K steps over nibble-plane pairs (TileConfig.unpack = 3,
# orbit/kernels/plane_dot.py) are tried up to this many rows: their gain is in the dequantize,
# which matters where the loop is bound by it, not where the MMAs are. That is decode and
# rollout batches up to 256 for NVFP4 (its loop at batch 256 decoded 40% fewer tok/s than
# INT4's, H200 session 8, with nearly INT4's bytes), so the tuner tries them that far.
PAIRS_MAX_M = 256


# The swapped loop (TileConfig.swap: y^T = W @ x^T, the dequantized weight tile the wgmma's A
# operand straight from registers, x^T the B operand of bm = 16..64 columns) is for decode rows;
# past 64 rows the plain tiles' wgmma already has M >= 64.
SWAP_MAX_M = 64


def swap_configs(m: int, fmt: str, grid: str = "quick") -> list[TileConfig]:
    """Swapped `tl.dot` tiles at m rows: bm the x rows rounded up to 16..64, bo 64 or 128
    weight rows (the MMA's M), 64-256 deep (FP8: 128 at most, one scale block per step)."""
    bm = min(64, max(16, 1 << max(0, math.ceil(math.log2(max(1, m))))))
    brs = (64, 128) + ((256,) if fmt != "fp8" else ())
    stages = (3, 4) + ((2,) if grid == "full" else ())
    return [TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=s, swap=True)
            for bo in (64, 128) for br in brs for s in stages
            if (bm * br * 2 + bo * br * 2) * s <= 200 * 1024]


def split_variants(c: TileConfig, m: int, n: int, k: int, sms: int) -> list[TileConfig]:
    """`c` with its K split 2, 4 or 8 ways (TileConfig.split) where its tiles leave SMs idle:
    up to 4 programs per SM, at least two K steps per slice."""
    tiles = -(-m // c.bm) * -(-n // c.bo)
    if tiles >= sms:
        return []
    return [replace(c, split=sp) for sp in (2, 4, 8)
            if tiles * sp <= 4 * sms and -(-k // c.br) >= 2 * sp]


# Register-fed tiles (nibble-plane pairs without the pipeliner, orbit/kernels/plane_dot.py:
# "Register-fed"): their loads are hidden by programs, not stages, so they are tried with K
# splits up to this many programs per SM (the rule, `_qgemm.regfed_split`, aims at half).
REG_FED_MAX_PROGRAMS_PER_SM = 16


def register_fed_configs(m: int, n: int, k: int, fmt: str, sms: int) -> list[TileConfig]:
    """Plane-pair tiles with one stage at m <= SWAP_MAX_M rows (INT4, NVFP4): swapped (64 or
    128 weight rows, the wgmma's register A operand) and, up to 16 rows, unswapped with 16-row
    x tiles (mma.sync, both operands in registers; 64 weight columns); 128 or 256 deep; each
    unsplit and split 2-16 ways while the grid stays within REG_FED_MAX_PROGRAMS_PER_SM
    programs per SM and a slice keeps two K steps."""
    if fmt not in PLANE_PAIR_FORMATS or m > SWAP_MAX_M:
        return []
    bm = min(64, max(16, 1 << max(0, math.ceil(math.log2(max(1, m))))))
    shapes = [(True, 64), (True, 128)] + ([(False, 64)] if m <= 16 else [])
    out = []
    for swap, bo in shapes:
        for br in (128, 256):
            tiles = -(-m // bm) * -(-n // bo)
            for sp in (1, 2, 4, 8, 16):
                if sp > 1 and (tiles * sp > REG_FED_MAX_PROGRAMS_PER_SM * sms
                               or -(-k // br) < 2 * sp):
                    continue
                out.append(TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=1, swap=swap,
                                      split=sp, unpack=UNPACK_PLANE_PAIRS))
    return out


def candidates(m: int, n: int, k: int, fmt: str, device: torch.device, grid: str = "quick"
               ) -> tuple[Route, list[Route]]:
    """(the rules' route, every distinct candidate including it) for one shape and M."""
    with ROUTES.scoped(None):
        rules = _qgemm.route(m, n, k, fmt, False, device)
    routes = [rules, Route("dequant")]
    if m <= _qgemm.GEMV_MAX_M:
        routes.append(Route("gemv"))
    if grid != "regfed":  # (regfed: the rules, dequant, GEMV and the register-fed tiles only)
        routes += [Route("dot", c) for c in dot_configs(m, fmt, grid)]
    from orbit.kernels.gemv import num_sms  # (gemv imports _qgemm)

    routes += [Route("dot", c) for c in register_fed_configs(m, n, k, fmt, num_sms(device))]
    seen: list[Route] = []
    for r in routes:
        if r not in seen:
            seen.append(r)
    return rules, seen


def _kernel(qw: QuantizedWeight) -> Callable[..., Tensor]:
    from orbit.kernels.dispatch import _kernel_for

    fn = _kernel_for(qw)
    if fn is None:
        raise RuntimeError("qmm tuning needs Triton (the fused kernels)")
    return fn


def rel_err(y: Tensor, ref: Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """The process's file descriptor 2 into a temporary file for the block; its text is in
    the yielded list afterwards. A candidate that does not compile makes Triton's MLIR pass
    manager print its diagnostics there from C++ (sys.stderr cannot catch them), once per
    failing candidate; the tuner keeps them with the candidate's note instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    text: list[str] = []
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            text.append(f.read().decode(errors="replace"))


def measure(route: Route, x: Tensor, qws: list[QuantizedWeight], timer: Timer,
            ref: Tensor) -> Measured:
    """Check `route` on the first weight copy against `ref`, then time it over all copies.
    A route that does not compile, fails or misses the reference is returned untimed, with
    the reason (and the compiler's first diagnostic line, which it printed to fd 2; the
    text a working candidate printed there is passed on)."""
    fmt, (n, k), m = qws[0].fmt, qws[0].shape, x.shape[0]
    kern = _kernel(qws[0])
    forced = RouteTable(device=device_name(x.device))
    forced.add(fmt, n, k, m, route)
    with ROUTES.scoped(forced):
        failed = None
        with captured_stderr() as diag:
            try:
                y = kern(x, qws[0])
            except Exception as e:  # noqa: BLE001 (out of shared memory, a compile error)
                failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if failed is not None:
            first = next((ln.strip() for ln in diag[0].splitlines() if ln.strip()), "")
            return Measured(route, None, failed + (f" ({first[:160]})" if first else ""))
        if diag[0]:
            sys.stderr.write(diag[0])
        err = rel_err(y, ref)
        if not err <= MAX_REL_ERR:
            return Measured(route, None, f"relative error {err:.2e} > {MAX_REL_ERR}")
        calls = [lambda q=q: kern(x, q) for q in qws]
        return Measured(route, timer(calls))


def tune_shape(fmt: str, n: int, k: int, m: int, qws: list[QuantizedWeight], timer: Timer,
               grid: str = "quick", min_gain: float = 0.03, seed: int = 0) -> ShapeResult:
    """Measure every candidate for one (format, shape, M) and choose the route."""
    device = qws[0].tensors[next(iter(qws[0].tensors))].device
    gen = torch.Generator(device=device).manual_seed(seed + m)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    ref = (x.float() @ qws[0].dequantize(torch.float32).T)
    rules, cands = candidates(m, n, k, fmt, device, grid)
    results = [measure(r, x, qws, timer, ref) for r in cands]
    # second round: the three fastest tl.dot tiles with their K split (where SMs sit idle)
    from orbit.kernels.gemv import num_sms  # (gemv imports _qgemm)

    dots = sorted((r for r in results if r.seconds is not None and r.route.kind == "dot"),
                  key=lambda r: r.seconds)[:SPLIT_FROM_BEST]
    tried = {r.route for r in results}
    for d in dots:
        for c in split_variants(d.route.config, m, n, k, num_sms(device)):
            if Route("dot", c) not in tried:
                tried.add(Route("dot", c))
                results.append(measure(Route("dot", c), x, qws, timer, ref))
    timed = [r for r in results if r.seconds is not None]
    base = results[0]
    if base.seconds is None:
        raise RuntimeError(f"{fmt} n={n} k={k} m={m}: the rules' route {describe(rules)} fails "
                           f"its own check ({base.note}); the kernels are broken here")
    best = min(timed, key=lambda r: r.seconds)  # type: ignore[arg-type, return-value]
    chosen = best.route if best.seconds < base.seconds * (1 - min_gain) else rules
    return ShapeResult(fmt, n, k, m, base, best, chosen, results, qws[0].nbytes())


def tune(shapes: Iterable[tuple[int, int, int]], formats: Iterable[str], ms: Iterable[int],
         make_weight: Callable[[str, int, int, int], QuantizedWeight], copies: Callable[[int], int],
         timer: Timer, device: torch.device, grid: str = "quick", min_gain: float = 0.03,
         log: Callable[[ShapeResult], None] | None = None) -> tuple[RouteTable, list[ShapeResult]]:
    """The route table for `shapes` (n, k, max rows) x `formats` x `ms`. `make_weight(fmt, n,
    k, seed)` builds one weight copy; `copies(nbytes)` says how many to rotate over."""
    table = RouteTable(device=device_name(device))
    results = []
    for fmt in formats:
        for n, k, max_m in shapes:
            qw0 = make_weight(fmt, n, k, 0)
            qws = [qw0] + [make_weight(fmt, n, k, s) for s in range(1, copies(qw0.nbytes()))]
            for m in ms:
                if m > max_m:
                    continue
                res = tune_shape(fmt, n, k, m, qws, timer, grid, min_gain)
                us = (lambda s: None if s is None else round(s * 1e6, 3))  # noqa: E731
                table.add(fmt, n, k, m, res.chosen,
                          {"us": us(res.best.seconds if res.chosen == res.best.route
                                    else res.rules.seconds),
                           "rules": describe(res.rules.route), "rules_us": us(res.rules.seconds)})
                results.append(res)
                if log is not None:
                    log(res)
            del qws
    return table, results


def graph_timer(reps: int = 20, warmup: int = 5) -> Timer:
    """Seconds per call of the closures (over different weight copies), captured as one CUDA
    graph and replayed: launch overhead out, weights from DRAM, as in a graphed decode step.
    `reps` / `warmup`: do_bench's milliseconds of timed and warm-up replays."""
    from triton.testing import do_bench

    def timer(calls: list[Callable[[], Any]]) -> float:
        for c in calls:  # compile and warm outside the capture
            c()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for c in calls:
                c()
        ms = do_bench(g.replay, warmup=warmup, rep=reps, return_mode="median")
        del g
        return ms * 1e-3 / len(calls)

    return timer


def l2_copies(device: torch.device) -> Callable[[int], int]:
    """Weight copies that together span 3x the device's L2 (so no timed call reads L2)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    return lambda nbytes: max(2, min(512, -(-3 * max(l2, 1) // max(nbytes, 1))))


def weight_maker(device: torch.device, int4_group: int = 128
                 ) -> Callable[[str, int, int, int], QuantizedWeight]:
    from orbit.kernels.random_weights import random_qweight

    def make(fmt: str, n: int, k: int, seed: int) -> QuantizedWeight:
        kw = {"group_size": int4_group} if fmt in ("int4", "int8") else {}
        return random_qweight(fmt, n, k, seed=seed, device=device, **kw)

    return make
