"""The native rollout engine: continuous batching over a slot KV cache, in the trainer's process.

The engine runs the trainer's own `CausalLM` (same modules, same kernels, whatever adapter
slot is active), so the log-probs it returns are the trainer's up to batch shape effects.
It holds no copy of the weights: only a KV cache, which `release_kv_cache()` frees between
rollout and training and the next `generate` re-allocates.

One `generate` call: validate every request, queue them in a `Scheduler` (torch-free), then
loop: a *prefill* step packs waiting prompts into one forward (each prompt once, its KV copied
to the slots of its other samples, its n first tokens sampled from the same logits), or a
*decode* step advances every running sequence by one token (on CUDA by replaying a captured
graph, see cuda_graphs.py). A finished sequence frees its slot for the next waiting request.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch
from torch import nn

from orbit.kernels.grid_barrier import take_timeouts
from orbit.kernels.pdl import pdl_available, pdl_scope
from orbit.models.attention import (
    VARLEN_PAGE,
    AttnBatch,
    KVCache,
    cache_dtype,
    cu_seqlens_from_lengths,
    varlen_supported,
)
from orbit.rollout.cuda_graphs import DecodeGraphs
from orbit.rollout.sampling import make_batch, sample, sequence_key
from orbit.rollout.scheduler import PrefillGroup, Scheduler, Sequence
from orbit.rollout.types import Completion, SamplingParams

log = logging.getLogger(__name__)


def default_graph_key(model: nn.Module) -> Hashable:
    """What a captured graph depends on besides shapes.

    A module's own `graph_key()` when it defines one. Otherwise, for an adapter (a module with
    `active_slot`): the active slot plus the version counters of that slot's tensors. The
    version part is conservative: a module that caches something derived from its slot
    tensors (OFT's rotation) computes it in Python, outside the graph, so new values written
    into the slot (`AdapterSet.stage`) need a new capture. A module whose forward only reads
    its slot tensors (LoRA) can define `graph_key()` returning its active slot to skip that.
    """
    parts = []
    for name, m in model.named_modules():
        if hasattr(m, "graph_key"):
            parts.append((name, m.graph_key()))
        elif hasattr(m, "active_slot"):
            slot = m.active_slot
            versions: tuple[int, ...] = ()
            if slot is not None and hasattr(m, "slot_tensors"):
                versions = tuple(t._version for t in m.slot_tensors(slot).values())
            parts.append((name, slot, versions))
    return tuple(parts)


def token_ids(prompt: Any) -> list[int]:
    """One prompt as a list of Python ints: a list/tuple of integers, or a 1-D integer tensor.

    Anything else raises a ValueError that says what was passed, not "prompt is empty": a
    str (text not yet tokenized) or a 2-D tensor (a batch of one) is an easy mistake.
    """
    if isinstance(prompt, torch.Tensor):
        if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"prompt must hold integer token ids, got a {prompt.dtype} tensor")
        if prompt.dim() != 1:
            raise ValueError(f"prompt must be a 1-D tensor of token ids, got shape {tuple(prompt.shape)}"
                             + ("; pass one row per prompt" if prompt.dim() == 2 else ""))
        return prompt.tolist()
    if isinstance(prompt, (str, bytes)):
        raise ValueError(  # noqa: TRY004 (generate collects a bad request's ValueError)
            f"prompt must be a list of token ids (ints), got {type(prompt).__name__} "
            f"{prompt[:40]!r}; tokenize it first")
    if not isinstance(prompt, (list, tuple)):
        hint = "; generate takes a list of prompts" if isinstance(prompt, Integral) else ""
        raise ValueError(  # noqa: TRY004 (as above)
            f"prompt must be a list of token ids (ints), got {type(prompt).__name__}{hint}")
    for t in prompt:
        if not isinstance(t, Integral) or isinstance(t, bool):
            raise ValueError(  # noqa: TRY004 (as above)
                f"prompt must be a list of token ids (ints), it holds {t!r} ({type(t).__name__})")
    return [int(t) for t in prompt]


@dataclass
class _Inflight:
    """A launched decode step: its sequences, its sampled tokens on the device (the inputs of
    an overlapped next step) and their copies on the way to the host."""

    seqs: list[Sequence]
    tok: torch.Tensor  # [B] int64, device
    tok_host: torch.Tensor  # [B] pinned host copies (CUDA) or the tensors themselves (CPU)
    lp_host: torch.Tensor
    ready: torch.cuda.Event | None

    @classmethod
    def start(cls, seqs: list[Sequence], tok: torch.Tensor, lp: torch.Tensor) -> _Inflight:
        if not tok.is_cuda:
            return cls(seqs, tok, tok, lp, None)
        th = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
        lh = torch.empty(lp.shape, dtype=lp.dtype, pin_memory=True)
        th.copy_(tok, non_blocking=True)
        lh.copy_(lp, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, tok, th, lh, ready)

    def read(self) -> tuple[list[int], list[float]]:
        """The sampled tokens and log-probs (waits for the step)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tok_host.tolist(), self.lp_host.tolist()


class Engine:
    """Samples completions from `model` (a CausalLM: forward(ids, pos, attn), logits(h)).

    max_num_seqs: sequences decoded together (KV slots). max_model_len: prompt + completion
    tokens per sequence. kv_cache_memory: None sizes the cache for max_num_seqs x
    max_model_len; a float in (0, 1] uses that fraction of the free CUDA memory (CPU: same as
    None); an int is a byte budget. When the budget holds fewer slots than max_num_seqs,
    fewer sequences run at once. dtype: KV-cache dtype (default: the model's norm dtype; float32
    on a CPU outside exact mode, whose SDPA reads the cache in float32: `attention.cache_dtype`).
    cuda_graph: replay captured decode graphs on CUDA (ignored on CPU and for MoE models,
    whose routing syncs with the host). exact: batch-size-invariant decode: no padding to a
    graph bucket (graphs are captured per exact batch size), so a sequence's logits do not
    depend on how many padding rows run beside it.
    tokenizer: anything with `.decode(ids) -> str`, or a decode function; needed for stop
    strings and `Completion.text`. eos_token_ids: default `model.config.eos_token_ids`.
    seed: seeds the draws of per-request seeds for requests without one.
    graph_key: returns what captured graphs depend on (default `default_graph_key`).
    fuse_siblings: stack the buffers of each q/k/v and gate/up QuantLinear group (views, no
    copy) so a decode step runs one GEMV per group instead of one per projection
    (orbit.quant.siblings; the model keeps its module layout, exact mode and autograd are
    untouched). None: on CUDA only.
    split_kv: decode steps of the "triton" attention backend run the fast-mode decode kernel
    (orbit.kernels.attention_decode): each sequence's keys split over several programs when
    the batch leaves SMs idle, a measured launch shape at every batch size. It changes the
    reduction order, so None means `not exact` and exact mode refuses True.
    overlap: launch decode step t+1 before reading step t's tokens on the host, feeding t's
    sampled tokens to t+1 on the device (as SGLang's overlap scheduler and vLLM's async
    scheduling do), so the host's per-step work (reading tokens, finish checks, building the
    next inputs) runs while the GPU computes. A sequence that stops at step t (stop token or
    string) gets one extra row in step t+1, which is discarded; a step where a sequence ends
    by length, or a waiting request could take a freed slot, is not overlapped. Same inputs
    and counter-based sampling: in exact mode the completions are bit-identical to the
    synchronous loop's; in fast mode a step carrying a discarded row has another batch shape
    (batch-shape rounding, as any change of batch composition). None: on CUDA.
    pdl: launch the decode step's Triton kernels with programmatic dependent launch
    (orbit.kernels.pdl: each kernel is scheduled while the one before it finishes and waits
    for it on the device, which hides the launch gaps between the ~400 short kernels of a
    batch-1 step). Scheduling only: the same kernels and the same bits. None: where the
    device has it (sm_90+).
    fuse_lora: run each decode step's LoRA adapters as one shrink and one expand-add launch
    per q/k/v, o, gate/up and down group (orbit/adapters/lora_decode.py) instead of four
    launches per adapted linear. Summation order differs from cuBLAS's, so None means
    `not exact and CUDA`, and exact mode refuses True. Linking happens here: inject adapters
    before building the engine.
    fold_rope: with split_kv, each decode step's attention launch also does the q/k norm +
    RoPE and the cache write of k and v (AttnBatch.attend_rope): one launch per layer fewer,
    but measured slower (H200, Qwen3-1.7B INT4 batch 1: 788 vs 818 tok/s, same run), so off
    by default; kept for the next kernel version. The query norm's sum runs in the attention
    tile's layout, so a value may differ in its last bit from the separate launch's.
    fold_norm: where each residual add + RMSNorm of a decode step runs. False: separate
    launches. True or "epilogue": inside the o_proj / down_proj decode GEMV before it
    (AttnBatch.fold_norm, orbit/kernels/norm_epilogue.py), two launches per layer fewer, the
    same row arithmetic; measured slower with PDL (H100, Qwen3-1.7B batch 1, same run: INT4
    724 vs 752 tok/s, FP8 483 vs 645, NVFP4 575 vs 578), kept for GPUs and kernels where it
    pays. "prologue" (the default) instead defers each add into the next GEMV that reads the
    normed row (the stacked q/k/v, and gate/up + SwiGLU: AttnBatch.fold_norm,
    orbit/kernels/norm_prologue.py), whose programs each do the add + norm before their K
    loop: no serial tail; the same bits. The default, for the formats where it measured
    faster (norm_prologue.PROLOGUE_FORMATS: INT4, +0.1-0.65% in five same-process pairs,
    H100, Qwen3-1.7B batch 1, session 20; NVFP4 was 2.5% slower and keeps the separate
    launches). Layers it does not fit (an adapter active, another format, exact mode,
    prefill) run the separate launches.
    chain_mlp: each batch-1 decoder MLP as one persistent launch (gate/up GEMV + SwiGLU, then
    the down GEMV, each down item starting as soon as its input slice is stored;
    AttnBatch.chain_mlp, orbit/kernels/gemv_chain.py) where its layers are INT4 plane-GEMV
    decode forwards with no adapter active. The same bits as the two launches. None (default):
    off. It measured +2.7% batch-1 decode against split-K GEMVs (H100, Qwen3-1.7B INT4, 762
    -> 783 tok/s, session 16), but the unsplit INT4 M = 1 GEMVs (gemv.PLANES_M1_UNSPLIT) are
    faster without it (807.6 tok/s off vs 759.4 on, session 18; docs/rollout.md).
    prefetch_weights: experimental (orbit/rollout/l2_prefetch.py): each split-KV decode
    attention launch (CUDA, split_kv) bulk-prefetches into L2 the frozen weights of the GEMVs
    after it (its layer's o_proj and MLP; l2_prefetch.AHEAD), while HBM is otherwise idle. A
    hint only: the same bits. Measured slower, so off (H100, Qwen3-1.7B INT4, session 27:
    batch 1 786 -> 727 tok/s, batch 64 21645 -> 20680; session 15's side-stream form lost
    43%).
    attn_backend: the AttnBatch backend of prefill and decode: "sdpa"; "varlen" (CUDA only:
    FlashAttention reading the KV cache in place; the cache's per-slot length is then
    max_model_len rounded up to a multiple of 256, FlashAttention's page constraint); or
    "triton" (CUDA only: orbit.kernels.attention_exact's kernel reading the cache in place, no
    per-layer gather of the batch's K/V); or "auto": varlen where `varlen_supported` says this
    torch and GPU run it natively for this model's heads and the KV cache is fp16/bf16, else
    triton for an fp16/bf16 cache on CUDA, else sdpa. `self.attn_backend` holds the resolved
    choice.
    """

    def __init__(
        self,
        model: nn.Module,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
        kv_cache_memory: float | int | None = None,  # noqa: PYI041 (int = bytes, float = fraction)
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        cuda_graph: bool = True,
        exact: bool = False,
        tokenizer: Any = None,
        eos_token_ids: list[int] | None = None,
        max_prefill_tokens: int = 8192,
        seed: int | None = None,
        graph_key: Callable[[], Hashable] | None = None,
        attn_backend: str = "sdpa",
        fuse_siblings: bool | None = None,
        split_kv: bool | None = None,
        overlap: bool | None = None,
        pdl: bool | None = None,
        fuse_lora: bool | None = None,
        prefetch_weights: bool = False,
        fold_rope: bool = False,
        fold_norm: bool | str = "prologue",
        chain_mlp: bool | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
        if isinstance(kv_cache_memory, float) and not (0.0 < kv_cache_memory <= 1.0):
            raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {kv_cache_memory}")
        if isinstance(kv_cache_memory, int) and kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory as bytes must be > 0, got {kv_cache_memory}")
        self.model = model
        self.config = model.config
        norm_w = model.model.norm.weight
        self.device = torch.device(device) if device is not None else norm_w.device
        self.model_dtype = norm_w.dtype if norm_w.is_floating_point() else torch.bfloat16
        self.dtype = dtype or cache_dtype(self.model_dtype, self.device, exact)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        pos_limit = self.config.max_position_embeddings
        if max_model_len > pos_limit:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={pos_limit}")
        self.attn_backend = self._resolve_backend(attn_backend)
        # No sequence reaches past max_model_len: the extra positions (never written, never
        # attended to) only pad each slot to whole FlashAttention pages.
        self.cache_len = max_model_len
        if self.attn_backend == "varlen":
            self.cache_len = -(-max_model_len // VARLEN_PAGE) * VARLEN_PAGE
        self.kv_cache_memory = kv_cache_memory
        self.use_graphs = cuda_graph and self.device.type == "cuda" and self.config.num_experts == 0
        self.exact = exact
        if split_kv and exact:
            raise ValueError("split_kv=True changes the reduction order of decode attention; "
                             "exact mode needs it off (leave split_kv=None)")
        self.split_kv = (not exact) if split_kv is None else split_kv
        self.fold_rope = fold_rope
        if fold_norm not in (False, True, "epilogue", "prologue"):
            raise ValueError(f"fold_norm={fold_norm!r}: expected False, True (= 'epilogue') "
                             "or 'prologue'")
        self.fold_norm = fold_norm
        self.chain_mlp = bool(chain_mlp)
        self.overlap = (self.device.type == "cuda") if overlap is None else overlap
        self.pdl = pdl_available(self.device) if pdl is None else pdl
        self.vocab_size = self.config.vocab_size
        self.max_prefill_tokens = max_prefill_tokens
        self.detokenize = self._decode_fn(tokenizer)
        self.eos_token_ids = list(self.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self._rng = random.Random(seed)
        self._graph_key = graph_key or (lambda: default_graph_key(self.model))
        self.cache: KVCache | None = None
        self.num_slots = 0  # sequence slots (the graphs' scratch slot is extra)
        self._graphs: DecodeGraphs | None = None
        self.last_stats: dict[str, float] = {}
        # q/k/v and gate/up QuantLinears share stacked buffers (views, no copy) and run as one
        # decode GEMV each (orbit.quant.siblings); default on CUDA, where decode is launch-bound.
        # OFT linears of one such set rotate their shared input in one launch (bit for bit the
        # separate rotations, so exact mode too).
        self.sibling_groups = self.oft_groups = 0
        if fuse_siblings if fuse_siblings is not None else self.device.type == "cuda":
            from orbit.adapters.oft import link_oft_groups
            from orbit.quant.siblings import fuse_siblings as _fuse

            self.sibling_groups = _fuse(self.model)
            self.oft_groups = link_oft_groups(self.model)
        if fuse_lora and exact:
            raise ValueError("fuse_lora=True changes the summation order of the LoRA products; "
                             "exact mode needs it off (leave fuse_lora=None)")
        self.lora_groups = 0
        if fuse_lora if fuse_lora is not None else (self.device.type == "cuda" and not exact):
            from orbit.adapters.lora_decode import link_lora_decode

            self.lora_groups = link_lora_decode(self.model)
        # (after the sibling fusion, which re-homes the q/k/v and gate/up buffers; the tables
        # hold raw addresses of frozen buffers the model keeps for its lifetime)
        self._l2_plan = None
        if prefetch_weights and self.device.type == "cuda" and self.split_kv:
            from orbit.rollout.l2_prefetch import layer_tables

            self._l2_plan = layer_tables(self.model, self.device) or None

    def _resolve_backend(self, attn_backend: str) -> str:
        if attn_backend not in ("auto", "sdpa", "varlen", "triton"):
            raise ValueError(f"attn_backend must be 'auto', 'sdpa', 'varlen' or 'triton', "
                             f"got {attn_backend!r}")
        gqa = self.config.num_kv_heads != self.config.num_heads
        if attn_backend == "auto":  # FlashAttention and the Triton kernel: fp16/bf16 caches
            half = self.dtype in (torch.float16, torch.bfloat16)
            if half and varlen_supported(self.device, cached=True, gqa=gqa):
                return "varlen"
            # The Triton kernel reads the cache in place; SDPA gathers each layer's K/V first
            # (H100, batch 64: +8% tok/s SmolLM2-135M, +14% Qwen3-1.7B; docs/benchmarks.md).
            return "triton" if half and self.device.type == "cuda" else "sdpa"
        if attn_backend in ("varlen", "triton") and self.device.type != "cuda":
            raise ValueError(f"attn_backend={attn_backend!r} needs a CUDA device, the engine is "
                             f"on {self.device}")
        return attn_backend

    @staticmethod
    def _decode_fn(tokenizer: Any) -> Callable[[list[int]], str] | None:
        if tokenizer is None:
            return None
        dec = getattr(tokenizer, "decode", None)
        if callable(dec):
            return dec
        if callable(tokenizer):
            return tokenizer
        raise ValueError(f"tokenizer must have .decode(ids) or be a decode function, got {type(tokenizer).__name__}")

    # -- KV cache ----------------------------------------------------------------------------

    def slot_bytes(self) -> int:
        """KV-cache bytes per sequence slot (keys + values, all layers, `cache_len` positions)."""
        c = self.config
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * c.num_layers * self.cache_len * c.num_kv_heads * c.head_dim * elem

    def _plan_slots(self) -> int:
        mem = self.kv_cache_memory
        if mem is None or (isinstance(mem, float) and self.device.type != "cuda"):
            return self.max_num_seqs
        if isinstance(mem, float):
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * mem)
        else:
            budget = int(mem)
        slots = min(self.max_num_seqs, budget // self.slot_bytes() - (1 if self.use_graphs else 0))
        if slots < 1:
            raise ValueError(
                f"kv_cache_memory={mem!r} ({budget} bytes) holds no sequence slot of "
                f"{self.slot_bytes()} bytes (max_model_len={self.max_model_len}); lower max_model_len"
            )
        if slots < self.max_num_seqs:
            log.info("KV cache holds %d of max_num_seqs=%d sequences", slots, self.max_num_seqs)
        return slots

    def allocate_kv_cache(self) -> None:
        """Allocate the cache (no-op if allocated); `generate` calls this itself."""
        if self.cache is not None:
            return
        self.num_slots = self._plan_slots()
        extra = 1 if self.use_graphs else 0  # scratch slot for graph padding rows
        self.cache = KVCache.for_model(self.config, self.num_slots + extra, self.cache_len,
                                       self.dtype, self.device)
        if self.use_graphs:
            self._graphs = DecodeGraphs(self.model, self.cache, self.num_slots, self.num_slots,
                                        self.attn_backend, split_kv=self.split_kv,
                                        fold_rope=self.fold_rope, fold_norm=self.fold_norm,
                                        chain_mlp=self.chain_mlp, l2_plan=self._l2_plan)
            if self.exact:  # one graph per exact batch size: no padding rows
                self._graphs.bs = list(range(1, self.num_slots + 1))

    def release_kv_cache(self) -> None:
        """Free the KV cache and the captured graphs (they point into it)."""
        self._graphs = None
        if self.cache is not None:
            self.cache.release()
            self.cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- generation --------------------------------------------------------------------------

    def validate(self, prompt: Any, params: SamplingParams) -> list[int]:
        """The prompt's token ids as a list of ints; raise ValueError (without the request
        index) if the request is invalid."""
        ids = token_ids(prompt)
        if len(ids) == 0:
            raise ValueError("prompt is empty (need at least one token id)")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, the context (max_model_len={self.max_model_len}) "
                "leaves no room for a new token"
            )
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt holds {bad!r}, not a token id in [0, {self.vocab_size})")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(params).__name__}")  # noqa: TRY004
        params.check(self.vocab_size)
        if params.stop_strings and self.detokenize is None:
            raise ValueError("stop_strings need a tokenizer or decode function on the engine")
        return ids

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams | list[SamplingParams],
        n: int = 1,
        on_error: str = "raise",
    ) -> list[list[Completion]]:
        """n completions per prompt, as [request][sample].

        prompts: one list of token ids per request (a 1-D integer torch tensor is accepted).
        sampling: one SamplingParams for all prompts or one per prompt.
        on_error: what an invalid request (empty or over-long prompt, bad token id, bad
        sampling value) does.
          "raise" (default): validate every request first and raise one ValueError naming each
              bad request (index and field) before anything runs;
          "skip": return n Completions with finish_reason "error" and `error` set
              ("request <i>: ...") for each bad request, and run the others.
        The default raises because a library caller that does not look at finish_reason would
        otherwise take empty completions for real ones (vLLM's offline `LLM.generate` also
        raises on an over-long prompt; its server answers each request on its own). Callers
        that batch unrelated requests and must not lose them all to one bad one (the RL
        rollout, orbit.trainer.worker) pass on_error="skip" and check finish_reason.
        Arguments that concern the whole call (n, on_error, the number of SamplingParams)
        raise in either mode.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple, torch.Tensor)):
            raise ValueError(  # noqa: TRY004 (every bad-input error of generate is a ValueError)
                f"prompts must be a list of prompts (each a list of token ids), "
                f"got {type(prompts).__name__}")
        if isinstance(sampling, SamplingParams):
            params = [sampling] * len(prompts)
        elif isinstance(sampling, (list, tuple)) and all(
                isinstance(sp, SamplingParams) for sp in sampling):
            params = list(sampling)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            raise ValueError(f"sampling must be a SamplingParams or a list of them (one per "
                             f"prompt), got {type(sampling).__name__}")
        errors: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                ids[i] = self.validate(p, sp)
            except ValueError as e:  # collected and reported below, never dropped
                errors[i] = f"request {i}: {e}"
        if errors and on_error == "raise":
            raise ValueError("; ".join(errors.values()))

        self.allocate_kv_cache()
        sched = Scheduler(self.num_slots, self.max_model_len, self.max_prefill_tokens,
                          self.eos_token_ids, self.detokenize)
        for i, p in ids.items():
            sp = params[i]
            # A caller's seed alone keys the samples (not the request's place in the list): the
            # same request gives the same tokens wherever it sits, as vLLM's per-request seeds.
            if sp.seed is not None:
                keys = [sequence_key(sp.seed, 0, j) for j in range(n)]
            else:
                keys = [sequence_key(self._rng.getrandbits(63), i, j) for j in range(n)]
            sched.add(i, p, n, sp, keys)
        state = self._graph_key() if self.use_graphs else None
        # Every iteration ends by reading some step's sampled tokens on the host (a sync): a
        # prefill's own, or (decode) the previous launch's, after launching the next one when
        # it may overlap. So the prefill/decode wall times add up to the device's.
        t0, new_tokens, overlapped = time.perf_counter(), 0, 0
        steps, secs, toks = {"prefill": 0, "decode": 0}, {"prefill": 0.0, "decode": 0.0}, {"prefill": 0, "decode": 0}
        inflight: _Inflight | None = None  # a launched decode step whose tokens are unread
        with torch.inference_mode():
            while inflight is not None or not sched.done():
                ts = time.perf_counter()
                if inflight is not None:
                    nxt = None
                    if self._can_overlap(sched, inflight):
                        nxt = self._launch_decode(inflight.seqs, state, after=inflight)
                        steps["decode"] += 1
                        overlapped += 1
                    kind, k = "decode", self._collect(sched, inflight)
                    inflight = nxt
                else:
                    step = sched.schedule()
                    kind = step.kind
                    steps[kind] += 1
                    if kind == "prefill":
                        k = self._prefill(sched, step.groups)
                    else:
                        inflight, k = self._launch_decode(step.seqs, state), 0
                toks[kind] += k
                secs[kind] += time.perf_counter() - ts
                new_tokens += k
        dt = time.perf_counter() - t0
        if self.chain_mlp and self.device.type == "cuda" and take_timeouts(self.device):
            # a persistent MLP launch whose programs could not all be resident (another
            # persistent launch on another stream of this GPU?) gave up waiting: its outputs,
            # and so these completions, are wrong
            raise RuntimeError("a persistent MLP launch (orbit/kernels/gemv_chain.py) timed out "
                               "waiting for its other programs; the completions of this call "
                               "are invalid. Run one chain_mlp engine per GPU at a time, or "
                               "build the Engine with chain_mlp=False")
        self.last_stats = {
            "seconds": dt, "new_tokens": new_tokens, "tokens_per_s": new_tokens / max(dt, 1e-9),
            "prefill_steps": steps["prefill"], "decode_steps": steps["decode"],
            "prefill_seconds": secs["prefill"], "decode_seconds": secs["decode"],
            "decode_tokens": toks["decode"], "overlapped_steps": overlapped,
            "decode_tokens_per_s": toks["decode"] / max(secs["decode"], 1e-9),
        }
        out = sched.results(len(prompts), n)
        for i, msg in errors.items():
            out[i] = [Completion([], [], "error", error=msg) for _ in range(n)]
        if self.detokenize is not None:
            for row in out:
                for c in row:
                    if c is not None and c.finish_reason != "error":
                        c.text = self.detokenize(c.tokens)
        assert all(c is not None for row in out for c in row)
        return out  # type: ignore[return-value]

    def _draw(self, seqs: list[Sequence], logits: torch.Tensor, shift: int = 0) -> _Inflight:
        """Sample one token per sequence from logits [B, V] (no wait). `shift`: tokens already
        sampled for each sequence but not yet appended (1 for an overlapped decode step), so
        the counter-based draw uses the index of the token being generated."""
        batch = make_batch([s.params for s in seqs], [s.key for s in seqs],
                           [len(s.tokens) + shift for s in seqs], self.vocab_size, self.device)
        # fast mode: the log-probs from the sampler kernel's sums (no [B, V] log-softmax);
        # exact mode: the trainer's own function, for its bits
        tok, lp = sample(logits, batch, fused_logprobs=not self.exact)
        return _Inflight.start(seqs, tok, lp)

    def _prefill(self, sched: Scheduler, groups: list[PrefillGroup]) -> int:
        assert self.cache is not None
        lens = [len(g.prompt) for g in groups]
        host = torch.tensor(
            [[t for g in groups for t in g.prompt], [i for n in lens for i in range(n)]], dtype=torch.int64
        )  # [2, T]: ids, positions
        dev = host.to(self.device, non_blocking=True)
        cu = cu_seqlens_from_lengths(lens, self.device)
        slots = torch.tensor([g.seqs[0].slot for g in groups], dtype=torch.int64, device=self.device)
        start = torch.zeros(len(groups), dtype=torch.int64, device=self.device)
        attn = AttnBatch.cached(self.cache, slots, cu, start, backend=self.attn_backend,
                                fold_norm=self.fold_norm, chain_mlp=self.chain_mlp)
        hidden = self.model(dev[0], dev[1], attn)  # [T, D]
        for g in groups:  # fork the prompt's KV into the slots of its other samples
            for s in g.seqs[1:]:
                self.cache.copy_slot(g.seqs[0].slot, s.slot, len(g.prompt))
        logits = self.model.logits(hidden[cu[1:].long() - 1])  # [G, V], last prompt token of each group
        seqs = [s for g in groups for s in g.seqs]
        if len(seqs) != len(groups):  # n samples of a prompt share its logits row
            rows = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.seqs], device=self.device)
            logits = logits[rows]  # [S, V]
        return self._collect(sched, self._draw(seqs, logits))

    def _can_overlap(self, sched: Scheduler, f: _Inflight) -> bool:
        """Whether the next step may be launched before `f`'s tokens are read: it is then the
        decode of the same sequences (so none may end by length at `f`, and none may have
        ended earlier: its row in `f` is a discarded one), and no waiting request could take
        a slot freed now (the scheduler would prefill it next)."""
        if not self.overlap or (sched.waiting and sched.free_slots):
            return False
        return all(s.finish_reason is None and len(s.tokens) + 1 < s.params.max_new_tokens
                   and s.length + 1 < self.max_model_len for s in f.seqs)

    def _launch_decode(self, seqs: list[Sequence], state: Hashable, after: _Inflight | None = None) -> _Inflight:
        """Launch a decode step of `seqs` (nothing waits for it). `after`: the launched step
        whose sampled tokens (on the device, not yet appended to `seqs`) are this step's
        inputs, one position further on. Its kernels (and a graph captured now) use PDL when
        `self.pdl`."""
        with pdl_scope(self.pdl):
            return self._decode_step(seqs, state, after)

    def _decode_step(self, seqs: list[Sequence], state: Hashable, after: _Inflight | None) -> _Inflight:
        assert self.cache is not None
        B = len(seqs)
        shift = 0 if after is None else 1
        ids = [s.tokens[-1] for s in seqs] if after is None else [0] * B  # else: from the device
        pos = [s.length - 1 + shift for s in seqs]  # the newest token is not in the cache yet
        slots = [s.slot for s in seqs]
        dev_ids = None if after is None else after.tok
        max_pos = max(pos)
        if self._graphs is not None:
            bp = self._graphs.padded_size(B)
            pad = bp - B
            t, p, sl = self._graphs.pad_row()
            host = torch.tensor([ids + [t] * pad, pos + [p] * pad, slots + [sl] * pad], dtype=torch.int64)
            hidden = self._graphs.run(state, host, B, max_pos, ids=dev_ids)  # [B, D]
        else:
            dev = torch.tensor([ids, pos, slots], dtype=torch.int64).to(self.device, non_blocking=True)
            if dev_ids is not None:
                dev[0].copy_(dev_ids)
            cu = torch.arange(B + 1, dtype=torch.int32, device=self.device)
            attn = AttnBatch.cached(self.cache, dev[2], cu, dev[1], max_context=max_pos + 1,
                                    backend=self.attn_backend, split_kv=self.split_kv,
                                    fold_rope=self.fold_rope, fold_norm=self.fold_norm,
                                    chain_mlp=self.chain_mlp, l2_plan=self._l2_plan)
            hidden = self.model(dev[0], dev[1], attn)
        return self._draw(seqs, self.model.logits(hidden), shift)  # logits [B, V]

    def _collect(self, sched: Scheduler, f: _Inflight) -> int:
        """Wait for `f`'s tokens, append them (rows of sequences that had already ended are
        dropped); returns how many were appended."""
        toks, lps = f.read()
        keep = [i for i, s in enumerate(f.seqs) if s.finish_reason is None]
        sched.append([f.seqs[i] for i in keep], [toks[i] for i in keep], [lps[i] for i in keep])
        return len(keep)
