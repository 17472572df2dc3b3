"""CUDA-graph replay of the engine's decode step.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured
graph removes the launch overhead, which is most of the step time at small batch sizes.
Graphs are captured lazily, the first time a (model state, batch bucket, context bucket)
combination is needed, and share one memory pool:

- batch buckets 1, 2, 4, ..., 256 up to max_num_seqs (plus max_num_seqs itself): a batch is
  padded to the next bucket, the padding rows decode token 0 at position 0 into a scratch KV
  slot that no sequence owns;
- context buckets 256, 512, 768, ..., 2048, 4096, ... up to max_model_len: the decode
  attention reads only the first L cache positions (AttnBatch max_context), so short
  sequences do not pay for the full context;
- model state: a hashable key from the engine (which adapter slots are active, ...), since a
  graph bakes in the tensors the Python forward chose at capture time. Graphs of the two
  most recent states are kept; older ones are dropped.

Inputs live in static buffers (ids, positions, slots: one [3, max_bs] int64 tensor that the
engine fills with a single host->device copy); the output is each graph's static hidden
states [Bp, D]. The LM head runs eagerly after the replay on the real rows only: one GEMM,
and no [Bp, V] logits buffer kept alive per graph.
"""

from __future__ import annotations

import gc
from collections.abc import Hashable

import torch
from torch import Tensor

from orbit.models.attention import AttnBatch, KVCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT_BUCKET = 256
MAX_STATES = 2  # model states (adapter slot choices) whose graphs are kept


def batch_buckets(max_bs: int) -> list[int]:
    """Captured batch sizes for up to `max_bs` sequences (ascending, last == max_bs)."""
    out = [b for b in BATCH_BUCKETS if b < max_bs]
    return out + [max_bs]


def context_buckets(max_len: int) -> list[int]:
    """Decode context lengths captured for a cache of `max_len` positions: every 256 up to
    2048 (the SDPA decode reads all L positions, so coarse buckets cost bandwidth), then
    doubling (few long sequences, fewer graphs)."""
    out, c = [], MIN_CONTEXT_BUCKET
    while c < max_len:
        out.append(c)
        c = c + MIN_CONTEXT_BUCKET if c < 2048 else c * 2
    return out + [max_len]


def bucket(value: int, buckets: list[int]) -> int:
    """Smallest bucket >= value."""
    for b in buckets:
        if b >= value:
            return b
    raise AssertionError((value, buckets))


class DecodeGraphs:
    """Captured decode forwards (ids, positions, slots -> float32 logits) over one KV cache."""

    def __init__(
        self, model: torch.nn.Module, cache: KVCache, max_bs: int, scratch_slot: int, backend: str = "sdpa",
        split_kv: bool = False,
        fold_rope: bool = False,
        fold_norm: bool | str = False,
        chain_mlp: bool = False,
        l2_plan: dict | None = None,
    ) -> None:
        assert cache.k.is_cuda, "CUDA graphs need the KV cache on a CUDA device"
        assert 0 <= scratch_slot < cache.num_slots
        self.model, self.cache, self.scratch = model, cache, scratch_slot
        self.device = cache.k.device
        self.backend = backend
        self.split_kv = split_kv  # AttnBatch.split_kv of the captured decode steps
        self.fold_rope = fold_rope  # ... and AttnBatch.fold_rope
        self.fold_norm = fold_norm  # ... and AttnBatch.fold_norm
        self.chain_mlp = chain_mlp  # ... and AttnBatch.chain_mlp
        self.l2_plan = l2_plan  # ... and AttnBatch.l2_plan
        self.bs = batch_buckets(max_bs)
        self.ctx = context_buckets(cache.max_len)
        self.max_bs = self.bs[-1]
        # rows: token id, position, slot; each graph reads columns [:Bp]
        self.inputs = torch.zeros(3, self.max_bs, dtype=torch.int64, device=self.device)
        self.cu = torch.arange(self.max_bs + 1, dtype=torch.int32, device=self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[Hashable, int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}

    def _evict_states(self, keep: Hashable) -> None:
        """Keep the graphs of at most MAX_STATES model states (the newest), so a key that
        changes every RL step (new adapter values) does not pile up graphs and pool memory."""
        states = list(dict.fromkeys(k[0] for k in self.graphs))  # insertion order = age
        if keep in states:
            return
        for old in states[: max(0, len(states) - MAX_STATES + 1)]:
            for k in [k for k in self.graphs if k[0] == old]:
                del self.graphs[k]

    def padded_size(self, batch: int) -> int:
        return bucket(batch, self.bs)

    def pad_row(self) -> tuple[int, int, int]:
        """(token, position, slot) of a padding row."""
        return 0, 0, self.scratch

    def _forward(self, bp: int, ctx: int) -> Tensor:
        ids, pos, slots = self.inputs[0, :bp], self.inputs[1, :bp], self.inputs[2, :bp]
        attn = AttnBatch.cached(self.cache, slots, self.cu[: bp + 1], pos, max_context=ctx,
                                backend=self.backend, split_kv=self.split_kv,
                                fold_rope=self.fold_rope, fold_norm=self.fold_norm,
                                chain_mlp=self.chain_mlp, l2_plan=self.l2_plan)
        return self.model(ids, pos, attn)  # [bp, D] hidden

    def _capture(self, bp: int, ctx: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Every row points at the scratch slot, so warm-up and capture write no live KV.
        self.inputs[0, :bp] = 0
        self.inputs[1, :bp] = 0
        self.inputs[2, :bp] = self.scratch
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            self._forward(bp, ctx)  # lazy init (cuBLAS workspaces, Triton autotune) happens here
        cur.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # A dead engine's graphs (cyclic garbage) destroyed by an automatic GC pass in the
        # middle of this capture invalidate it (cudaGraphExecDestroy is not allowed while a
        # stream captures; torch >= 2.6 no longer collects on entering torch.cuda.graph). So
        # collect first and keep the collector off until the capture ends.
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(bp, ctx)
        finally:
            if was_enabled:
                gc.enable()
        return graph, out

    def run(self, state: Hashable, host_inputs: Tensor, batch: int, max_pos: int,
            ids: Tensor | None = None) -> Tensor:
        """host_inputs [3, Bp] int64 on the CPU (already padded to `padded_size(batch)`),
        max_pos = the largest real position -> hidden [batch, D] (a view of static memory,
        valid until the next `run`). ids: [batch] int64 on the device replacing the real rows'
        token ids (an overlapped step's inputs: the previous step's samples)."""
        bp = host_inputs.shape[1]
        assert bp == self.padded_size(batch), (bp, batch)
        ctx = bucket(max_pos + 1, self.ctx)
        key = (state, bp, ctx)
        entry = self.graphs.get(key)
        if entry is None:
            self._evict_states(keep=state)
            entry = self.graphs[key] = self._capture(bp, ctx)
        graph, out = entry
        self.inputs[:, :bp].copy_(host_inputs, non_blocking=True)
        if ids is not None:
            self.inputs[0, :batch].copy_(ids)
        graph.replay()
        return out[:batch]
