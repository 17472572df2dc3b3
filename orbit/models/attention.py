"""Attention over packed batches, with or without a KV cache.

The trainer and the rollout engine run the same decoder layers; only how attention reads
keys/values differs, and that is all this file decides. An `AttnBatch` describes one forward:

- `AttnBatch.packed(cu_seqlens)`: variable-length sequences laid end to end (no padding),
  causal within each sequence. Training and scoring use this.
- `AttnBatch.cached(cache, slots, cu_seqlens, start_pos)`: the engine's prefill and decode.
  Sequence b's new tokens are written into KV-cache slot `slots[b]` at positions
  `start_pos[b], start_pos[b]+1, ...` and attend causally to that slot's positions
  `[0, start_pos[b] + i]`.

A cached batch where every sequence has exactly one new token (T == B) is a *decode* step:
one batched SDPA over the gathered slots with a length mask, no Python loop over sequences,
no host synchronisation and no data-dependent shapes, so the engine can CUDA-graph it.
Prefill (and packed training) loops over sequences with one SDPA call each; that reads
`cu_seqlens` on the host once per batch (not per layer).

`backend="varlen"` (opt-in, CUDA only) replaces all of that with
`torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen): one call per layer for a
packed batch, and for cached batches the KV cache is read in place as a paged cache (one page
of `max_len` tokens per slot, `block_table = slots`), so decode gathers nothing. Checked
against the SDPA path by tests/gpu/test_models_attention_gpu.py.

`varlen_attn`'s keywords differ between torch releases (2.11's takes no `enable_gqa`;
2.12's takes `enable_gqa`, `seqused_k` and `block_table`), so `varlen_api()` reads its
signature once and the backend uses what exists: without `enable_gqa` a packed batch repeats
the K/V heads for GQA; a cached batch that the installed API cannot read in place runs the
SDPA path instead, with a one-time warning. `varlen_supported()` says whether varlen runs
natively (what `attn_backend="auto"` in the engine asks).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from orbit.kernels.kv_write import kv_write

# FlashAttention reads a paged KV cache only in pages of a multiple of 256 tokens; the varlen
# backend makes each slot one page, so a cache it reads needs max_len % VARLEN_PAGE == 0.
VARLEN_PAGE = 256


@dataclass(frozen=True)
class VarlenAPI:
    """What the installed `torch.nn.attention.varlen.varlen_attn` accepts."""

    fn: Callable[..., Tensor]
    causal: dict[str, Any]  # the keyword that makes it causal: window_size=(-1, 0) or is_causal
    gqa: bool  # accepts enable_gqa: K/V with fewer heads than Q, without repeating them
    paged: bool  # accepts seqused_k and block_table: reads the KV cache in place


@functools.lru_cache(maxsize=1)
def varlen_api() -> VarlenAPI | None:
    """The installed varlen_attn's capabilities, read once from its signature; None when
    torch has none (or one without a causal mode)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9: no varlen API; callers use SDPA
        return None
    return read_varlen_api(varlen_attn)


def read_varlen_api(fn: Callable[..., Tensor]) -> VarlenAPI | None:
    """Capabilities of a `varlen_attn` from its signature (None: no causal mode)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:  # bottom-right aligned causal window
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return VarlenAPI(fn, causal, "enable_gqa" in params,
                     "seqused_k" in params and "block_table" in params)


def varlen_supported(device: torch.device | str, *, cached: bool = False,
                     gqa: bool = False) -> bool:
    """Whether backend="varlen" runs natively on `device`: CUDA with compute capability >= 8.0
    (FlashAttention 2) and a varlen_attn that reads a KV cache in place (`cached`) and takes
    fewer K/V heads than query heads (`gqa`, cached batches only: a packed batch repeats the
    heads itself). Otherwise the backend falls back to SDPA (cached) or fails (no API, CPU)."""
    device = torch.device(device)
    api = varlen_api()
    if device.type != "cuda" or api is None or not torch.cuda.is_available():
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return not cached or (api.paged and (api.gqa or not gqa))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class KVCache:
    """Preallocated keys/values for `num_slots` sequences of up to `max_len` tokens.

    `k`, `v`: [num_layers, num_slots, max_len, num_kv_heads, head_dim]. A slot is one
    sequence; the engine owns the slot -> sequence assignment. Keys are stored *after* RoPE
    (and after Qwen3's k_norm), so a cached key never needs its position again.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_slots, max_len, num_kv_heads, head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.num_layers, self.num_slots, self.max_len = num_layers, num_slots, max_len
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype

    @classmethod
    def for_model(cls, config: Any, num_slots: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str) -> KVCache:
        """A cache shaped for a `ModelConfig`."""
        return cls(config.num_layers, num_slots, max_len, config.num_kv_heads, config.head_dim,
                   dtype, device)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (all layers), e.g. to
        fork n samples from one prefilled prompt."""
        if not (0 <= length <= self.max_len):
            raise ValueError(f"copy_slot length {length} outside [0, {self.max_len}]")
        self.k[:, dst, :length].copy_(self.k[:, src, :length])
        self.v[:, dst, :length].copy_(self.v[:, src, :length])

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def release(self) -> None:
        """Drop the cache tensors so their memory can be reused; the object is unusable after."""
        self.k = torch.empty(0)
        self.v = torch.empty(0)


@dataclass
class AttnBatch:
    """How attention reads keys/values for one forward; build with `packed` or `cached`.

    `routing` optionally carries a MoE routing recorder/replayer (orbit.models.moe.MoERouting)
    through the model, so the engine can record expert choices and the trainer replay them.
    """

    kind: str  # "packed" | "cached"
    cu_seqlens: Tensor  # [N+1] cumulative new-token counts, first element 0
    cache: KVCache | None = None
    slots: Tensor | None = None  # [N] int64 cache slot of each sequence
    start_pos: Tensor | None = None  # [N] int64 cache position of each sequence's first new token
    max_context: int | None = None  # decode reads cache positions [0, max_context)
    routing: Any = None
    # "sdpa" (reference, any device) | "varlen" (CUDA FlashAttention) | "triton" (cached
    # batches read the KV cache in place with orbit.kernels.attention_exact's kernel; packed
    # batches use SDPA)
    backend: str = "sdpa"
    # "triton" decode steps (one new token per sequence) run the fast-mode decode kernel
    # (orbit.kernels.attention_decode): split each sequence's keys over several programs
    # (flash-decoding) when the batch alone leaves SMs idle, with a measured launch shape at
    # every batch size (pick_decode). Changes the reduction order over keys: fast mode only,
    # exact mode leaves it False (the engine passes split_kv=not exact).
    split_kv: bool = False
    # with split_kv, a decode step's attention launch also does q/k norm + RoPE and the cache
    # write of k and v (`attend_rope`; orbit.kernels.attention_decode.DecodeRope): one launch
    # per layer fewer. False keeps the separate launch (same-run comparisons).
    fold_rope: bool = False
    # the decoder's residual add + RMSNorm inside the o_proj / down_proj launch where that is
    # the quantized decode GEMV in inference mode (orbit/kernels/norm_epilogue.py): two
    # launches per layer fewer. A forward option the batch carries to every layer, as the two
    # above; False keeps the separate launches. True is "epilogue"; "prologue" folds each add
    # + norm into the next GEMV that reads the normed row instead (the q/k/v and gate/up
    # plane GEMVs, orbit/kernels/norm_prologue.py; DecoderLayer.forward_prenorm).
    fold_norm: bool | str = False
    # the decoder MLP as one persistent launch (gate/up GEMV + SwiGLU, then the down GEMV)
    # where `gemv_chain.mlp_chain_fits` (INT4 plane-GEMV decode forwards, batch 1) and no
    # adapter is active (orbit/kernels/gemv_chain.py); the same bits. False keeps the two
    # launches. The engine sets it (Engine.chain_mlp).
    chain_mlp: bool = False
    # per layer index, byte ranges of frozen weights that the split-KV decode attention
    # launch prefetches into L2 as it starts (orbit/rollout/l2_prefetch.py; Engine(
    # prefetch_weights=True), CUDA sm_90); None: no prefetch
    l2_plan: dict[int, Any] | None = None
    _meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def packed(cls, cu_seqlens: Tensor, routing: Any = None, backend: str = "sdpa") -> AttnBatch:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        _check_backend(backend)
        return cls("packed", cu_seqlens, routing=routing, backend=backend)

    @classmethod
    def cached(
        cls,
        cache: KVCache,
        slots: Tensor,
        cu_seqlens: Tensor,
        start_pos: Tensor,
        max_context: int | None = None,
        routing: Any = None,
        backend: str = "sdpa",
        split_kv: bool = False,
        fold_rope: bool = False,
        fold_norm: bool | str = False,
        chain_mlp: bool = False,
        l2_plan: dict[int, Any] | None = None,
    ) -> AttnBatch:
        """`max_context` (a Python int, <= cache.max_len) bounds how many cache positions a
        decode step reads; it must exceed every `start_pos`. None reads the whole slot.
        `split_kv`, `fold_rope`, `fold_norm`, `chain_mlp`, `l2_plan`: see the fields."""
        n = slots.numel()
        if cu_seqlens.numel() != n + 1 or start_pos.numel() != n:
            raise ValueError(
                f"cached batch: slots has {n} entries, so cu_seqlens needs {n + 1} and start_pos {n}; "
                f"got {cu_seqlens.numel()} and {start_pos.numel()}"
            )
        if max_context is not None and not (0 < max_context <= cache.max_len):
            raise ValueError(f"max_context={max_context} outside (0, cache.max_len={cache.max_len}]")
        _check_backend(backend)
        return cls("cached", cu_seqlens, cache, slots, start_pos, max_context, routing, backend,
                   split_kv, fold_rope, fold_norm, chain_mlp, l2_plan)

    # -- per-batch metadata, computed at the first layer and reused by the others --------------

    def _host_seqlens(self) -> list[int]:
        if "seqlens" not in self._meta:
            self._meta["seqlens"] = torch.diff(self.cu_seqlens).tolist()
        return self._meta["seqlens"]

    def _decode_meta(self, device: torch.device) -> tuple[Tensor, int]:
        """Bool mask [B, 1, 1, L] of readable cache positions, and L."""
        if "mask" not in self._meta:
            assert self.cache is not None and self.start_pos is not None
            L = self.max_context or self.cache.max_len
            pos = torch.arange(L, device=device)
            self._meta["mask"] = (pos[None, :] <= self.start_pos[:, None])[:, None, None, :]
            self._meta["L"] = L
        return self._meta["mask"], self._meta["L"]

    def _write_index(self, num_tokens: int) -> tuple[Tensor, Tensor]:
        """(slot, position) of every new token, [T] each."""
        if "widx" not in self._meta:
            assert self.slots is not None and self.start_pos is not None
            if num_tokens == self.slots.numel():  # decode: one token per sequence, no sync
                self._meta["widx"] = (self.slots, self.start_pos)
            else:
                lens = torch.diff(self.cu_seqlens).to(self.slots.device)
                seq = torch.repeat_interleave(
                    torch.arange(lens.numel(), device=lens.device), lens, output_size=num_tokens
                )  # [T] sequence of each token
                within = torch.arange(num_tokens, device=lens.device) - self.cu_seqlens.to(
                    lens.device
                )[seq]
                self._meta["widx"] = (self.slots[seq], self.start_pos[seq] + within)
        return self._meta["widx"]

    def kv_destination(self, layer: int, num_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Where layer `layer`'s new K/V go, for a caller that can store them itself (the
        model's fused q/k norm + RoPE + cache write, orbit.kernels.rope.qk_norm_rope_kv):
        (k cache, v cache [S, max_len, Hkv, D], slot [T], position [T]); None for packed
        batches (no cache). A caller that stored them says so with `kv_written(layer)`."""
        if self.kind != "cached" or self.cache is None:
            return None
        w_slot, w_pos = self._write_index(num_tokens)
        return self.cache.k[layer], self.cache.v[layer], w_slot, w_pos

    def kv_written(self, layer: int) -> None:
        """Layer `layer`'s new K/V are in the cache already: its `attend` skips the write."""
        self._meta[("written", layer)] = True

    def _write_kv(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' K/V [T, Hkv, D] in the cache (unless the caller did, see
        `kv_destination`); returns this layer's cache views (k, v) [S, max_len, Hkv, D]."""
        cache = self.cache
        assert cache is not None
        kc, vc = cache.k[layer], cache.v[layer]
        if not self._meta.pop(("written", layer), False):
            w_slot, w_pos = self._write_index(k.shape[0])
            kv_write(kc, vc, k, v, w_slot, w_pos)  # one launch for K and V on CUDA
        return kc, vc

    def _max_new(self, num_tokens: int) -> int:
        """Longest run of new tokens in one sequence (host int). Decode (one token per
        sequence) needs no device sync, so it stays CUDA-graph capturable."""
        if num_tokens == self.cu_seqlens.numel() - 1:
            return 1
        if "max_new" not in self._meta:
            self._meta["max_new"] = max(self._host_seqlens())
        return self._meta["max_new"]

    # -- the attention read itself --------------------------------------------------------------

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (after RoPE) -> [T, H, D]."""
        if self.backend == "varlen":
            return self._attend_varlen(layer, q, k, v)
        if self.backend == "triton" and self.kind == "cached":
            return self._attend_cached_triton(layer, q, k, v)
        if self.kind == "packed":
            return self._attend_packed(q, k, v)
        return self._attend_cached(layer, q, k, v)

    def _attend_packed(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.empty_like(q)
        start = 0
        for n in self._host_seqlens():
            sl = slice(start, start + n)
            out[sl] = _sdpa(q[sl], k[sl], v[sl], mask=None, causal=True)
            start += n
        assert start == q.shape[0], (start, q.shape)
        return out

    def _attend_cached(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        cache = self.cache
        assert cache is not None and self.slots is not None and self.start_pos is not None
        T = q.shape[0]
        kc, vc = self._write_kv(layer, k, v)  # [S, max_len, Hkv, D] views
        if T == self.slots.numel():
            return self._attend_decode(kc, vc, q)
        # Prefill: one SDPA per sequence against its slot's positions [0, start + n).
        out = torch.empty_like(q)
        starts = self._meta.setdefault("starts", self.start_pos.tolist())
        slots = self._meta.setdefault("slot_list", self.slots.tolist())
        t0 = 0
        for n, s, p in zip(self._host_seqlens(), slots, starts):
            ctx = p + n
            kb = kc[s, :ctx]  # [ctx, Hkv, D] (_sdpa casts to the dtype attention runs in)
            vb = vc[s, :ctx]
            if p == 0:
                out[t0 : t0 + n] = _sdpa(q[t0 : t0 + n], kb, vb, mask=None, causal=True)
            else:
                # query i sits at position p + i and may see keys j <= p + i
                qi = torch.arange(n, device=q.device)[:, None] + p
                mask = torch.arange(ctx, device=q.device)[None, :] <= qi  # [n, ctx]
                out[t0 : t0 + n] = _sdpa(q[t0 : t0 + n], kb, vb, mask=mask, causal=False)
            t0 += n
        return out

    def attend_rope(self, layer: int, q: Tensor, k: Tensor, v: Tensor, q_weight: Tensor | None,
                    k_weight: Tensor | None, eps: float, cos: Tensor, sin: Tensor
                    ) -> Tensor | None:
        """A decode step's attention from the raw q, k, v [B, H(kv), D] in one launch: q/k
        norm (weights or None) + RoPE, the cache write of k and v, and the attention itself
        (orbit.kernels.attention_decode.DecodeRope), where it runs: the triton backend's
        split-KV decode step with `fold_rope`; None elsewhere (the caller runs the separate
        launches and then `attend`)."""
        if not (self.fold_rope and self.split_kv and self.backend == "triton"
                and self.kind == "cached" and self.cache is not None and self.slots is not None
                and q.shape[0] == self.slots.numel()):
            return None
        from orbit.kernels.attention_decode import DecodeRope

        return self._decode_split(layer, q, self.cache.k[layer], self.cache.v[layer],
                                  DecodeRope(k, v, q_weight, k_weight, eps, cos, sin))

    def _decode_split(self, layer: int, q: Tensor, kc: Tensor, vc: Tensor,
                      rope: Any = None) -> Tensor:
        """The split-KV decode kernel on this layer's cache (see `split_kv`)."""
        from orbit.kernels.attention_decode import attention_decode_split, pick_decode
        from orbit.kernels.gemv import num_sms

        assert self.slots is not None and self.start_pos is not None
        ctx = self.max_context or kc.shape[1]
        if "decode" not in self._meta:  # same for every layer of the batch
            self._meta["decode"] = pick_decode(q.shape[0], kc.shape[-2], ctx, num_sms(q.device))
        # split 1 (the batch fills the GPU) runs the same kernel with one chunk: 16-row
        # tiles for the GQA group, the live length bounds the walk (not the tile's last row)
        split, cfg = self._meta["decode"]
        return attention_decode_split(q, kc, vc, self.slots, self.start_pos, ctx, split,
                                      config=cfg, rope=rope,
                                      l2_prefetch=self.l2_table(layer, "attention", q))

    def l2_table(self, layer: int, site: str, x: Tensor) -> Any:
        """Layer `layer`'s L2 prefetch table (l2_plan) if launch `site` ("attention" or
        "rope") is the one that issues it (orbit.rollout.l2_prefetch.WHERE; the rope launch
        only where it runs, i.e. without fold_rope) and `x` is on CUDA; else None."""
        if not self.l2_plan or not x.is_cuda:
            return None
        from orbit.rollout import l2_prefetch

        where = "attention" if self.fold_rope else l2_prefetch.WHERE
        return self.l2_plan.get(layer) if where == site else None

    def _attend_cached_triton(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write the new K/V, then attend straight from the cache: no per-layer gather of the
        batch's K/V (the SDPA decode path copies kc[slots, :L] for every layer and step)."""
        from orbit.kernels.attention_exact import attention_cached_exact
        from orbit.kernels.matmul_exact import interpreting

        assert self.cache is not None and self.slots is not None and self.start_pos is not None
        on_cpu = not q.is_cuda and interpreting()  # Triton's interpreter: the CPU tests
        if not (q.is_cuda or on_cpu):
            raise ValueError("attention backend 'triton' needs CUDA tensors; use backend='sdpa'")
        kc, vc = self._write_kv(layer, k, v)
        if self.split_kv and q.shape[0] == self.slots.numel():  # a decode step
            return self._decode_split(layer, q, kc, vc)
        return attention_cached_exact(q, kc, vc, self.cu_seqlens, self.slots, self.start_pos,
                                      self._max_new(q.shape[0]), force_triton=on_cpu)

    def _attend_decode(self, kc: Tensor, vc: Tensor, q: Tensor) -> Tensor:
        mask, L = self._decode_meta(q.device)
        dt = sdpa_dtype(q)
        kb = kc[self.slots, :L].to(dt).transpose(1, 2)  # [B, Hkv, L, D]
        vb = vc[self.slots, :L].to(dt).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2).to(dt), kb, vb, attn_mask=mask, enable_gqa=kb.shape[1] != q.shape[1]
        )  # [B, H, 1, D]
        return o.squeeze(2).to(q.dtype)


    def _attend_varlen(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if not q.is_cuda:
            raise ValueError("attention backend 'varlen' needs CUDA tensors; use backend='sdpa'")
        api = varlen_api()
        if api is None:
            raise ValueError(f"attention backend 'varlen' needs torch.nn.attention.varlen "
                             f"(torch >= 2.9), this is torch {torch.__version__}; use 'sdpa'")
        gqa = k.shape[1] != q.shape[1]
        if self.kind == "cached" and not (api.paged and (api.gqa or not gqa)):
            _warn_once(f"torch {torch.__version__}'s varlen_attn cannot read the KV cache in place"
                       f"{' with GQA' if api.paged else ''}; cached batches use the SDPA path")
            return self._attend_cached(layer, q, k, v)
        cu = self._meta.get("cu32")
        if cu is None:
            cu = self._meta["cu32"] = self.cu_seqlens.to(device=q.device, dtype=torch.int32)
        kw = dict(api.causal)
        if gqa and api.gqa:
            kw["enable_gqa"] = True
        if self.kind == "packed":
            n = max(self._host_seqlens())
            if gqa and not api.gqa:
                # [T, Hkv, D] -> [T, H, D]: query head h reads K/V head h // (H / Hkv), the
                # grouping SDPA's enable_gqa uses.
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return api.fn(q, k, v, cu, cu, n, n, **kw)
        cache = self.cache
        assert cache is not None and self.slots is not None and self.start_pos is not None
        if cache.max_len % VARLEN_PAGE:
            raise ValueError(f"backend 'varlen' reads the KV cache as pages of max_len tokens; "
                             f"FlashAttention needs max_len % {VARLEN_PAGE} == 0, "
                             f"got {cache.max_len}")
        kc, vc = self._write_kv(layer, k, v)  # [S, max_len, Hkv, D]: S pages of max_len
        if "table" not in self._meta:
            self._meta["table"] = self.slots.to(torch.int32)[:, None]  # [B, 1] one page each
            new = torch.diff(cu)  # [B] new tokens per sequence
            self._meta["used"] = (self.start_pos.to(torch.int32) + new).to(torch.int32)
        # Causal window (-1, 0) is bottom-right aligned: query i of a sequence with `used` keys
        # sees keys [0, used - n + i], i.e. positions up to start_pos + i.
        return api.fn(
            q, kc, vc, cu, None, self._max_new(q.shape[0]), self.max_context or cache.max_len,
            seqused_k=self._meta["used"], block_table=self._meta["table"], **kw,
        )


def _check_backend(backend: str) -> None:
    if backend not in ("sdpa", "varlen", "triton"):
        raise ValueError(f"attention backend must be 'sdpa', 'varlen' or 'triton', got {backend!r}")


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """One sequence: q [n, H, D], k/v [m, Hkv, D] -> [n, H, D] in q's dtype, computed in
    `sdpa_dtype(q)`."""
    dt = sdpa_dtype(q)
    o = F.scaled_dot_product_attention(
        q.to(dt).transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
        k.to(dt).transpose(0, 1).unsqueeze(0),
        v.to(dt).transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return o[0].transpose(0, 1).to(q.dtype)


def sdpa_dtype(q: Tensor) -> torch.dtype:
    """The dtype the SDPA paths (packed, prefill, decode) compute attention in: float32 on a
    CPU, whatever the activations' dtype, because torch's CPU SDPA kernels run bf16 ~3x
    slower than float32 (docs/precision.md, "The compute dtype"); q's own dtype elsewhere.
    The trainer's packed forward and the engine's cached one take the same rule, so their
    log-probs still come from the same attention math."""
    return torch.float32 if q.device.type == "cpu" else q.dtype


def cache_dtype(model_dtype: torch.dtype, device: torch.device, exact: bool = False) -> torch.dtype:
    """The KV-cache dtype an engine on `device` defaults to: float32 on a CPU (its attention
    reads the cache in float32, `sdpa_dtype`: storing bf16 keys there exactly saves converting
    every layer's whole context at every step), the model's dtype elsewhere and in exact mode
    (whose one-order attention reads K/V in the compute dtype, as its packed form does)."""
    return torch.float32 if device.type == "cpu" and not exact else model_dtype


def cu_seqlens_from_lengths(lengths: list[int], device: torch.device | str = "cpu") -> Tensor:
    """[N] lengths -> [N+1] int32 cumulative offsets starting at 0."""
    if any(n <= 0 for n in lengths):
        raise ValueError(f"sequence lengths must be positive, got {lengths}")
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return out.to(device)


def positions_from_lengths(lengths: list[int], device: torch.device | str = "cpu") -> Tensor:
    """Positions 0..n-1 of each packed sequence, concatenated: [sum(lengths)] int64."""
    return torch.cat([torch.arange(n) for n in lengths]).to(device)
