"""Experimental (off by default: measured slower, docs/rollout.md): L2 prefetch of a decoder
layer's GEMV weights from inside its decode attention launch.

Why: a batch-1 decode step's GEMVs stream their weights at ~25-40% of copy bandwidth (their
time is each warp's instruction and latency chain, docs/benchmarks.md), and the q/k norm +
RoPE and attention launches between them read almost nothing from DRAM, so HBM idles for
~10 us of every layer. With the weights already in L2 the Qwen3-1.7B INT4 M = 1 GEMVs ran
15-21% faster alone (session 16's "hot" rows: 2048x12288 9.7 -> 7.7 us, 6144x2048 8.2 ->
6.7, 2048x2048 5.4 -> 4.6).

What: `layer_tables(model, device)` lists, per layer, 64 KB pieces of the frozen buffers of
the GEMVs that run after that layer's attention (o_proj, the MLP's; with AHEAD "next" also
the next layer's q/k/v). The decode attention kernel (AttnBatch.l2_plan ->
`attention_decode_split(l2_prefetch=...)`), or with WHERE "rope" the q/k norm + RoPE +
cache-write launch before it (`rope.qk_norm_rope_kv(l2_prefetch=...)`), spreads the table
over its programs (`pdl.prefetch_table_l2`), each issuing `cp.async.bulk.prefetch.L2` over
its pieces before its PDL wait: no extra launch, no side stream (session 15's side-stream
form cut the decode step's PDL edges and lost 43%), no registers held, nothing waits for it.
A hint only: the computed bits are the same (GPU test).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from orbit.kernels.pdl import L2Prefetch

CHUNK = 1 << 16  # bytes per prefetch instruction
# which weights a layer's attention prefetches: "rest" (its o_proj and MLP, ~21 MB a
# Qwen3-1.7B INT4 layer) or "next" (those and the next layer's q/k/v, ~25 MB; L2 is 50 MB)
AHEAD = "rest"
# which launch issues a layer's table: "attention" (the split-KV decode attention) or "rope"
# (the q/k norm + RoPE + cache-write launch before it: more lead time; where the engine runs
# that launch, i.e. fold_rope off, the default). Read when a forward is traced or captured.
WHERE = "attention"


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
            out += [b for b in m.buffers(recurse=False) if b is not None]
    return out


def layer_tables(model: nn.Module, device: torch.device,
                 ahead: str | None = None) -> dict[int, L2Prefetch]:
    """Per decoder layer index, the L2Prefetch table its decode attention issues: the frozen
    QuantLinear buffers of its o_proj and dense MLP (not a MoE block's experts, most of which
    a token does not read), and with `ahead` "next" (default AHEAD) the next layer's q/k/v
    too. Layers with nothing quantized after them get no entry."""
    from orbit.kernels.pdl import L2Prefetch

    ahead = AHEAD if ahead is None else ahead
    if ahead not in ("rest", "next"):
        raise ValueError(f"l2_prefetch ahead={ahead!r}: expected 'rest' or 'next'")
    layers = list(model.model.layers)
    tables: dict[int, L2Prefetch] = {}
    for i, layer in enumerate(layers):
        bufs = _frozen_buffers(layer.self_attn.o_proj)
        if not getattr(layer, "is_moe", False):  # (a MoE block: only its routed experts run)
            bufs += _frozen_buffers(layer.mlp)
        if ahead == "next" and i + 1 < len(layers):
            nxt = layers[i + 1].self_attn
            bufs += [b for name in ("q_proj", "k_proj", "v_proj")
                     for b in _frozen_buffers(getattr(nxt, name))]
        addrs, sizes = plan_chunks(bufs)
        if addrs:
            tables[i] = L2Prefetch(torch.tensor(addrs, dtype=torch.int64, device=device),
                                   torch.tensor(sizes, dtype=torch.int32, device=device))
    return tables
