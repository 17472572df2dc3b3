"""Programmatic dependent launch (PDL) for decode kernels (Hopper and later).

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running; `griddepcontrol.wait` then blocks until that kernel has finished and its writes are
visible. What it saves is the gap between two dependent kernels (launch latency, CTA ramp-up
behind the previous kernel's tail), which in a graphed batch-1 decode step of ~400 short
kernels is a visible share of the step.

`pdl_enter(PDL)` is the first statement of a PDL-capable kernel: with PDL it waits for the
previous kernel (before any load or store, so no read-after-write or write-after-read hazard
with it is possible) and lets the next kernel launch at once (its CTAs then wait in their own
`pdl_enter`). Without PDL it is nothing. `pdl_launch(device, ctas)` gives the keyword
arguments a launch adds (the `PDL` constexpr and, with PDL, Triton's `launch_pdl`); Triton's
interpreter (CPU tests) takes neither, and off CUDA they are just `PDL=False`.

Chains stay correct transitively: a PDL kernel C launched early while B runs waits in
`pdl_enter` for B to finish, and B did nothing before A had finished. A kernel launched
without PDL (torch, cuBLAS) before or after a PDL one serializes as usual.

Who turns it on: the rollout engine, around its decode steps (and their graph captures, which
keep the launch attribute as programmatic graph edges), with `pdl_scope(True)`; the decode
kernels' wrappers ask `pdl_launch`. A scope (a context variable, like
`torch.inference_mode`) rather than a parameter threaded through every module between the
engine and the kernels; outside a scope nothing changes (training, exact mode, tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton

try:  # Triton >= 3.3 on CUDA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = HAS_TRITON
except ImportError:  # pragma: no cover - older Triton or a CPU-only install
    HAS_PDL = False

    def gdc_wait() -> None:  # placeholders keep the jit source importable
        raise RuntimeError("PDL needs Triton >= 3.3")

    gdc_launch_dependents = gdc_wait


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """PDL 1 (True): wait for the previous kernel, then let the next one launch. PDL 2
    (EARLY_RELEASE): let the next one launch first, then wait (see EARLY_RELEASE)."""
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, nbytes):
    """Bulk-prefetch `nbytes` (a multiple of 16; addresses 16-byte aligned) from each address
    in `ptrs` (pointers or int64 addresses) into L2 (sm_90 `cp.async.bulk.prefetch.L2`: no
    registers, no completion to wait for). `nbytes` is one size or one per address; a lane
    whose size is 0 issues nothing. For data no earlier kernel writes, e.g. a GEMV's frozen
    weights: issued before `pdl_enter`, the first steps' bytes stream in while the previous
    kernel still runs (and orbit/rollout/l2_prefetch.py's side-stream prefetch)."""
    addr = ptrs.to(tl.int64, bitcast=True)
    n = (tl.zeros(ptrs.shape, tl.int32) + nbytes).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
        "mov.u32 $0, 0; }", "=r,l,r", [addr, n], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_table_l2(addr_ptr, size_ptr, N, prog, PER: tl.constexpr, LANES: tl.constexpr):
    """Program `prog`'s share of an L2Prefetch table: entries prog * PER .. + PER - 1 (of N),
    one per lane of a LANES-wide vector (>= PER; 128 for kernels of at most 4 warps, so no
    lane holds a copy of another's and issues the same prefetch again), lanes past PER off."""
    lane = tl.arange(0, LANES)
    i = prog * PER + lane
    ok = (lane < PER) & (i < N)
    # masked lanes get size 0: prefetch_l2 issues nothing for them
    prefetch_l2(tl.load(addr_ptr + i, mask=ok, other=0), tl.load(size_ptr + i, mask=ok, other=0))


@dataclass(frozen=True)
class L2Prefetch:
    """A table of byte ranges (int64 addresses, int32 sizes: multiples of 16, 16-byte aligned,
    on the GPU) that a decode launch bulk-prefetches into L2 as it starts (before its PDL
    wait), spread over its programs with `prefetch_table_l2`. orbit/rollout/l2_prefetch.py
    builds them from frozen weights. CUDA sm_90 only; a hint: the same bits."""

    addrs: Tensor
    sizes: Tensor

    def launch_args(self, programs: int) -> tuple[tuple, dict[str, int]]:
        """((addr_ptr, size_ptr, N) runtime arguments, {PF_PER, PF_LANES} constexprs) of a
        launch of `programs` programs (one table entry or more each)."""
        n = self.addrs.numel()
        per = 1 << (-(-n // max(programs, 1)) - 1).bit_length() if n else 0  # power of two
        return (self.addrs, self.sizes, n), {"PF_PER": per, "PF_LANES": max(128, per)}


def l2_prefetch_args(table: L2Prefetch | None, programs: int,
                     dummy: Tensor) -> tuple[tuple, dict[str, int]]:
    """L2Prefetch.launch_args, or (with no table) dummies and PF_PER = 0, which compiles the
    prefetch out."""
    if table is None:
        return (dummy, dummy, 0), {"PF_PER": 0, "PF_LANES": 128}
    return table.launch_args(programs)


@cache
def _sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL (CUDA, sm_90+, Triton with GDC)."""
    return HAS_PDL and device.type == "cuda" and _sm90(_index(device))


_ACTIVE: ContextVar[bool] = ContextVar("orbit_pdl", default=False)


@contextmanager
def pdl_scope(on: bool) -> Iterator[None]:
    """Launch the decode kernels inside this block with PDL (where the device has it)."""
    token = _ACTIVE.set(on)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# Release the next kernel before waiting (launches get PDL = 2): a kernel's programs are
# then scheduled as soon as all programs of the one before have started, not once that one
# has passed its own wait, so a chain of PDL kernels has its next few kernels resident at
# once. What a kernel does before its wait (loads of frozen weights, GemvConfig.w_preload)
# then overlaps more of the kernels before it. Safe for the same reason as plain PDL: every
# wait still waits for the previous kernel's completion, and a dependent launches only once
# all programs of its primary are resident, so it never takes a slot one of them needs.
# A module switch (bench_engine.py --w-preload ...r compares it in one run). Off: measured
# slower (H100, session 18, Qwen3-1.7B INT4 batch 1: 689.0 / 648.6 tok/s with 1 / 2 preloaded
# steps against 748.4 with neither; docs/rollout.md).
EARLY_RELEASE = False

# PDL only for grids of at most this many CTAs per SM (H200, session 8): the next kernel's
# CTAs, launched early, hold SM slots while they wait, which slowed a 1024-CTA NVFP4 GEMV
# (6144x2048 split 8: 11.8 -> 16.7 us) while 384-512-CTA ones gained 0.5-0.8 us.
PDL_MAX_CTAS_PER_SM = 4


def pdl_launch(device: torch.device, ctas: int, forced: bool = False) -> dict[str, Any]:
    """Keyword arguments for a launch of `ctas` CTAs on `device`: {"PDL": True (2 with
    EARLY_RELEASE), "launch_pdl": True} inside `pdl_scope(True)` on a device that has PDL, for
    grids small enough (PDL_MAX_CTAS_PER_SM), or whenever `forced` (a benchmark's config) and
    the device has it; else {"PDL": False}."""
    if not pdl_available(device):
        return {"PDL": False}
    if not forced:
        from orbit.kernels.gemv import num_sms  # (gemv imports this module)

        if not _ACTIVE.get() or ctas > PDL_MAX_CTAS_PER_SM * num_sms(device):
            return {"PDL": False}
    return {"PDL": 2 if EARLY_RELEASE else True, "launch_pdl": True}
