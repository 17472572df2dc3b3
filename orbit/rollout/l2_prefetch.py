"""Experimental (off by default, not yet measured): pull the next block's frozen weights into
L2 on a side stream while the current block computes, in decode steps.

Why: a batch-1 decode step's GEMVs read 2-13 MB each and run at ~20-25% of copy bandwidth in
the engine (docs/benchmarks.md, sessions 6-9): they are latency-bound, so the DRAM bandwidth
they leave idle could stream the weights the next kernels will read. `bench_qmm.py --gemv`'s
"gemv-hot" rows (the same weights every call, L2-resident) bound what this can reach; measure
those first.

What: `WeightPrefetcher(model)` registers forward pre-hooks: when a decoder layer's attention
starts, its MLP's weights (gate/up, down) are prefetched; when its MLP starts, the next
layer's attention weights (q/k/v, o). Each prefetch is one launch on a side stream, forked
from the current stream at that point, of `cp.async.bulk.prefetch.L2` instructions over
CHUNK-byte pieces of the module's buffers (no registers, nothing waits for them); a forward
hook on the model joins the side stream back, so a CUDA-graph capture of the step holds the
branch and replays it. Prefetch is a hint: the computed bits cannot change (GPU test). Only
inside `active(True)`, which the engine opens around decode steps with
`Engine(prefetch_weights=True)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from orbit.kernels._triton import tl, triton
from orbit.kernels.pdl import prefetch_l2

CHUNK = 1 << 16  # bytes per prefetch instruction
BLOCK = 128  # chunks per program


@triton.jit
def _l2_prefetch_kernel(addr_ptr, size_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    # masked lanes get size 0: prefetch_l2 issues nothing for them
    prefetch_l2(tl.load(addr_ptr + offs, mask=ok, other=0),
                tl.load(size_ptr + offs, mask=ok, other=0))


def plan_chunks(tensors: list[Tensor], chunk: int = CHUNK) -> tuple[list[int], list[int]]:
    """(addresses, sizes) covering every tensor's bytes in pieces of at most `chunk` bytes,
    each start rounded down and each size rounded up to 16 bytes (what the instruction takes;
    the few extra bytes stay inside the allocator's 512-byte-aligned block). Tensors sharing
    storage (sibling views of one stacked buffer) are covered once per distinct range."""
    seen: set[tuple[int, int]] = set()
    addrs: list[int] = []
    sizes: list[int] = []
    for t in tensors:
        if t.numel() == 0:
            continue
        lo = t.data_ptr() // 16 * 16
        hi = -(-(t.data_ptr() + t.numel() * t.element_size()) // 16) * 16
        if (lo, hi) in seen:
            continue
        seen.add((lo, hi))
        for a in range(lo, hi, chunk):
            addrs.append(a)
            sizes.append(min(chunk, hi - a))
    return addrs, sizes


def _frozen_buffers(module: nn.Module) -> list[Tensor]:
    """The buffers of every QuantLinear under `module` (the frozen base weights)."""
    from orbit.quant.linear import QuantLinear

    out: list[Tensor] = []
    for m in module.modules():
        if isinstance(m, QuantLinear):
            out += [b for b in m.buffers(recurse=False) if b is not None and b.is_cuda]
    return out


class WeightPrefetcher:
    """Side-stream L2 prefetch of the next block's weights in decode forwards (see above)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)
        self._on = False
        self._forked = False
        self._tables: dict[int, tuple[Tensor, Tensor]] = {}
        self._handles = []
        layers = list(model.model.layers)
        for i, layer in enumerate(layers):
            targets = [(layer.self_attn, layer.mlp)]
            if i + 1 < len(layers):
                targets.append((layer.mlp, layers[i + 1].self_attn))
            for trigger, ahead in targets:
                addrs, sizes = plan_chunks(_frozen_buffers(ahead))
                if not addrs:
                    continue
                self._tables[id(trigger)] = (
                    torch.tensor(addrs, dtype=torch.int64, device=device),
                    torch.tensor(sizes, dtype=torch.int32, device=device))
                self._handles.append(trigger.register_forward_pre_hook(self._prefetch))
        self._handles.append(model.register_forward_hook(self._join))

    def _prefetch(self, module: nn.Module, args: tuple) -> None:
        if not self._on:
            return
        addrs, sizes = self._tables[id(module)]
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            n = addrs.numel()
            _l2_prefetch_kernel[(triton.cdiv(n, BLOCK),)](addrs, sizes, n, BLOCK=BLOCK,
                                                          num_warps=4)
        self._forked = True

    def _join(self, module: nn.Module, args: tuple, out: object) -> None:
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self.side)
            self._forked = False

    @contextmanager
    def active(self, on: bool) -> Iterator[None]:
        prev, self._on = self._on, on
        try:
            yield
        finally:
            self._on = prev

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
