"""A grid-wide barrier for persistent Triton kernels, and how many programs may wait at one.

A persistent kernel (orbit/kernels/gemv_chain.py) runs phases that depend on each other's
outputs in one launch: every program finishes phase A, waits at the barrier until all have,
then starts phase B. That is only safe when every program of the grid is resident at once (a
program spinning at the barrier must never hold the SM slot another program needs to arrive),
so the launch sizes its grid with `resident_programs`, which reads the compiled kernel's
registers and shared memory and the device's per-SM limits.

The barrier (`grid_barrier`) uses three int32 words, `barrier_words(device)`:
- [0] arrivals: each program's thread 0 adds 1 (acq_rel, after a CTA barrier, so the
  program's stores are released with it: the pattern the split-K fix-up uses); the last to
  arrive resets it to 0, so every launch leaves it as it found it (CUDA-graph replays);
- [1] generation: read before arriving; the last arriver bumps it (release), the others spin
  until it changes (acquire). Compared by inequality, so it may wrap;
- [2] timeout flag: a program that spins SPIN_LIMIT times without seeing the generation move
  sets it and goes on (a wrong result, but a flagged one instead of a hung GPU); tests read it.

Triton's interpreter runs programs one after another, so a barrier there would wait forever:
persistent kernels take a PHASE constexpr that compiles the barrier out and runs one phase per
launch (the CPU tests and the GPU reference), see gemv_chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton

# Spins (one L2 atomic each, ~0.3-1 us) before a waiting program gives up and flags a timeout.
SPIN_LIMIT = 1 << 24
# The barrier's three words, then 68 for a kernel's own finer-grained counters (gemv_chain:
# per-K-slice readiness, 32 producer counts and 32 reader counts; two LoRA shrink counter
# pairs), all left at 0 by each launch.
BARRIER_WORDS = 3 + 64 + 4


@triton.jit
def _nanosleep(ns: tl.constexpr):
    tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r",
                              [tl.full([1], ns, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def grid_barrier(bar_ptr, P, SPIN: tl.constexpr, SLEEP: tl.constexpr = 0):
    """Wait until all P programs of the grid have reached this call (see the module doc).
    SLEEP: nanoseconds a waiting program backs off between reads of the generation word
    (0: none), so fewer reads of one L2 line compete with the arrivals."""
    tl.debug_barrier()  # this program's stores happen before its thread 0 arrives
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
    if arrived == P - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem="release")
    else:
        cur = gen
        spins = 0
        while (cur == gen) & (spins < SPIN):
            if SLEEP > 0:
                _nanosleep(SLEEP)
            cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
            spins += 1
        if cur == gen:
            tl.atomic_xchg(bar_ptr + 2, 1, sem="relaxed")
    tl.debug_barrier()  # no thread reads phase B's inputs before thread 0 saw the generation


class BarrierWords:
    """BARRIER_WORDS zeroed int32 words per (device, stream) for `grid_barrier` (kept, like
    gemv.ArrivalCounters: a buffer first made during CUDA-graph capture is zeroed by the
    capture and stays alive for replays). Launches in stream order share them."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, int], Tensor] = {}

    def get(self, device: torch.device) -> Tensor:
        if device.type != "cuda":
            return torch.zeros(BARRIER_WORDS, dtype=torch.int32, device=device)
        idx = device.index if device.index is not None else torch.cuda.current_device()
        key = (idx, torch.cuda.current_stream(device).cuda_stream)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.zeros(BARRIER_WORDS, dtype=torch.int32,
                                                device=device)
        return buf

    def take_timeouts(self, device: torch.device) -> int:
        """How many of `device`'s word sets (one per stream, CUDA-graph capture streams
        included) have their timeout flag set; clears the flags (synchronizes)."""
        idx = device.index if device.index is not None else torch.cuda.current_device()
        n = 0
        for (d, _), buf in self._bufs.items():
            if d == idx and bool(buf[2].item()):
                buf[2].zero_()
                n += 1
        return n


_WORDS = BarrierWords()  # process-wide on purpose: one set per device and stream


def barrier_words(device: torch.device) -> Tensor:
    """The barrier words of the current stream of `device`."""
    return _WORDS.get(device)


def take_timeouts(device: torch.device) -> int:
    """Word sets of `device` (any stream) whose waits gave up since the last call; clears them.
    A persistent launch's caller checks this where it can afford a sync (Engine.generate)."""
    if device.type != "cuda":
        return 0
    return _WORDS.take_timeouts(device)


def barrier_timed_out(device: torch.device) -> bool:
    """Whether a barrier on the current stream of `device` gave up waiting (synchronizes)."""
    return bool(barrier_words(device)[2].item())


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources that bound how many programs are resident at once."""

    sms: int
    threads: int = 2048
    regs: int = 65536
    shared: int = 233472  # bytes (H100: 228 KiB)
    blocks: int = 32


@cache
def sm_limits(device_index: int) -> SmLimits:
    p = torch.cuda.get_device_properties(device_index)
    return SmLimits(
        sms=p.multi_processor_count,
        threads=getattr(p, "max_threads_per_multi_processor", 2048),
        regs=getattr(p, "regs_per_multiprocessor", 65536),
        shared=getattr(p, "shared_memory_per_multiprocessor", 233472))


def programs_per_sm(regs_per_thread: int, shared_bytes: int, warps: int, lim: SmLimits) -> int:
    """Programs of one kernel that fit on one SM at once. Registers are allocated per warp in
    units of 256; each program also reserves 1 KiB of shared memory (the driver's)."""
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    by_regs = lim.regs // (regs_per_warp * warps)
    by_threads = lim.threads // (32 * warps)
    by_shared = lim.shared // (shared_bytes + 1024)
    return max(0, min(by_regs, by_threads, by_shared, lim.blocks))


@dataclass(frozen=True)
class Residency:
    """What `resident_programs` read off a compiled kernel, and its answer."""

    programs: int  # resident at once on the whole device
    per_sm: int
    regs: int  # registers per thread
    shared: int  # bytes of shared memory per program


def resident_programs(compiled: object, device: torch.device) -> Residency:
    """How many programs of a compiled Triton kernel (`JITFunction.warmup`'s result) are
    resident on `device` at once when nothing else runs."""
    compiled._init_handles()  # type: ignore[attr-defined]  (loads it; sets n_regs)
    meta = compiled.metadata  # type: ignore[attr-defined]
    idx = device.index if device.index is not None else torch.cuda.current_device()
    lim = sm_limits(idx)
    regs = compiled.n_regs  # type: ignore[attr-defined]
    per_sm = programs_per_sm(regs, meta.shared, meta.num_warps, lim)
    return Residency(lim.sms * per_sm, per_sm, regs, meta.shared)
