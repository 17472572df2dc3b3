"""Benchmark training forward+backward of a quantized base + LoRA: throughput and memory.

Not a roofline: a side-by-side comparison on one device, in one run, of the same model and
batch with different base precisions. Random weights (speed and memory do not depend on
them); the step is what `PolicyWorker._micro_step` runs, minus the policy-loss arithmetic:
a packed batch (`AttnBatch.packed(cu_seqlens)`, positions restarting at 0 per sequence)
-> `CausalLM` forward -> `token_logprobs` on every token (chunked, lm_head recomputed in
backward) -> mean -> backward, with gradients only into the LoRA parameters. No optimizer
step (it touches only the adapter and is the same for every base).

1. dense: Qwen3-1.7B and Qwen3-4B shapes, base in bf16 (plain nn.Linear) and int4 (group
   128, symmetric; --formats adds fp8 / nvfp4), all converted with
   orbit.quant.convert.convert_linears from the same bf16 random weights; LoRA r 32 alpha 64
   on every attention and MLP linear (orbit.adapters.inject, as the trainer builds it).
   Default batch 8 x 1024 = 8192 tokens. Goal of the issue: int4 >= 0.8x bf16 tokens/s with
   base weights <= 0.3x the bytes.
2. moe: a Qwen3-30B-A3B-shaped model with int4 experts and attention linears, LoRA on the
   attention linears (--moe-lora-experts adds every expert linear). Built on the meta device
   and filled in place (random int4 QuantLinears made directly on the device, other tensors
   random bf16), so the 61 GB bf16 model never exists. Default batch 4 x 1024 tokens.

Per row: median step time over --iters timed steps after --warmup untimed ones (synchronized
per step), tokens/s, base weight bytes (parameters + buffers of the attention/MLP/expert/router
linears under model.layers; embeddings and lm_head excluded) and their ratio to bf16,
model-resident memory after the build, and the peak allocated over the timed steps
(torch.cuda.max_memory_allocated after reset_peak_memory_stats). --grad-ckpt off,on runs
every row without and with per-layer activation checkpointing (CausalLM.gradient_checkpointing).
Each row is built, run and freed in its own try: a failure (e.g. out of memory) is printed
(traceback on stderr) and recorded as an "error" row, the others still run, and the exit
status is 1 if any failed. On a CPU (or with --small) every section runs on tiny shapes.
Prints JSON rows as it goes, a markdown table last; writes $OUT/bench_train.json (or --out).

    python scripts/bench/bench_train.py [--small] [--sections dense,moe] [--formats bf16,int4]
        [--grad-ckpt off,on] [--batch 8 --seq-len 1024] [--moe-lora-experts]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.adapters.inject import DEFAULT_TARGETS as LORA_TARGETS
from orbit.adapters.inject import AdapterConfig, AdapterSet, inject_adapters
from orbit.kernels.random_weights import random_qweight
from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.config import ModelConfig
from orbit.models.logprobs import token_logprobs
from orbit.models.transformer import CausalLM, RMSNorm
from orbit.quant.convert import convert_linears, name_matches
from orbit.quant.linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPES as ENGINE_SHAPES

# Shapes shared with the engine benchmark (qwen3-1.7b, tiny-llama, tiny-qwen3), plus the ones
# only training is measured on.
SHAPES = {
    **{k: v for k, v in ENGINE_SHAPES.items() if k in ("qwen3-1.7b", "tiny-llama", "tiny-qwen3")},
    "qwen3-4b": {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 2560,
                 "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0,
                 "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936,
                      "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                      "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                      "max_position_embeddings": 40960, "tie_word_embeddings": False,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    # Tiny MoE for --small / CPU: every dim a multiple of 128 so int4 groups of 128 fit.
    "tiny-moe": {**ENGINE_SHAPES["tiny-qwen3"], "architectures": ["Qwen3MoeForCausalLM"],
                 "tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 128, "norm_topk_prob": True},
}
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("*.experts.*",)
GIB = 1024**3


@dataclass(frozen=True)
class RunCfg:
    """What every row of one invocation shares."""

    device: torch.device
    dtype: torch.dtype
    lora_r: int
    lora_alpha: float
    warmup: int
    iters: int
    attn_backend: str


@dataclass(frozen=True)
class Batch:
    """One packed training micro-batch on the device."""

    input_ids: Tensor  # [T]
    positions: Tensor  # [T], 0..L-1 per sequence
    cu_seqlens: Tensor  # [B+1] int32
    targets: Tensor  # [T] the token each position predicts

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def _emit(rows: list[dict], row: dict) -> None:
    """Keep the row and print it at once, so a run cut off at its time limit still reports."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def _free(device: torch.device) -> None:
    """Return what the last row held to the allocator and the driver, so the next row's
    resident and peak numbers start from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _attempt(rows: list[dict], where: dict, device: torch.device, fn: Callable[..., Any],
             *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw), or None after recording its exception as an error row `where` (and
    its traceback on stderr), so one failing row (e.g. an OOM) does not lose the rest."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - reported in the row and on stderr, not dropped
        traceback.print_exc()
        _emit(rows, {**where, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        return None
    finally:
        _free(device)  # after the except block the failed row's frames (and tensors) are gone


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---- model construction ----------------------------------------------------------------------

def meta_model(shape: str) -> CausalLM:
    """The CausalLM of `shape` with no storage: construction costs nothing at any size."""
    cfg = ModelConfig.from_hf_dict(dict(SHAPES[shape]))
    with torch.device("meta"):
        return CausalLM(cfg)


def quantize_on_device(model: CausalLM, fmt: str, targets: tuple[str, ...], device: torch.device) -> int:
    """Replace every meta nn.Linear matching `targets` by a random `fmt` QuantLinear made
    directly on `device` (one linear at a time, so no bf16 copy of the model ever exists).
    Returns how many were replaced."""
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and any(name_matches(n, t) for t in targets)]
    for i, (name, lin) in enumerate(chosen):
        if lin.bias is not None:
            raise ValueError(f"{name}: random quantized linears are bias-free")
        gs = 128 if fmt in ("int4", "int8") else None
        kw = {"group_size": gs} if gs else {}
        # A different seed per linear: identical experts would route and compute alike.
        qw = random_qweight(fmt, lin.out_features, lin.in_features, seed=i, device=device, **kw)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(qw))
    return len(chosen)


def materialize(model: CausalLM, device: torch.device, dtype: torch.dtype, seed: int = 0) -> None:
    """Give every parameter still on the meta device random frozen storage on `device`: norms
    ones, everything else N(0, 0.02) (a trained model's scale, so logits stay moderate); a
    tied LM head gets the embedding's tensor. Then rebuild the float32 RoPE tables."""
    gen = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, nn.Parameter] = {}  # meta parameter id -> its replacement (keeps ties tied)
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                if isinstance(mod, RMSNorm):
                    t = torch.ones(p.shape, device=device, dtype=dtype)
                else:
                    t = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(dtype)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            mod._parameters[name] = made[id(p)]
    model.model.rotary_emb.reset(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"meta tensors left after materialize: {left[:5]}")


def dense_model(shape: str, fmt: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """Random bf16 model of `shape` on `device`, its linears then converted to `fmt` with the
    converter the loader uses (bf16: unchanged nn.Linear)."""
    model = meta_model(shape)
    materialize(model, device, dtype)
    if fmt != "bf16":
        convert_linears(model, fmt, group_size=128 if fmt in ("int4", "int8") else None)
    return model.requires_grad_(False)


def moe_model(shape: str, fmt: str, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """MoE model with `fmt` attention + expert linears made on the device from the start; the
    router gates, norms, embeddings and lm_head are random `dtype` tensors."""
    model = meta_model(shape)
    quantize_on_device(model, fmt, ATTN_TARGETS + EXPERT_TARGETS, device)
    materialize(model, device, dtype)
    return model.requires_grad_(False)


def _moe_with(model: CausalLM, experts: str) -> CausalLM:
    """Pick the expert path: "fused" = the grouped Triton kernel, "loop" = one GEMM per expert."""
    from orbit.models.moe import set_fused_experts

    set_fused_experts(model, experts == "fused")
    return model


def add_lora(model: CausalLM, targets: tuple[str, ...], cfg: RunCfg) -> AdapterSet:
    """LoRA as the trainer injects it (bf16 slots, base frozen), seeded for repeatability."""
    torch.manual_seed(0)
    return inject_adapters(model, AdapterConfig(kind="lora", r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                targets=targets, dtype=torch.bfloat16))


def base_weight_bytes(model: CausalLM) -> int:
    """Bytes of the frozen linears under model.layers (attention, MLP, experts, routers):
    their own parameters and buffers, not the adapters around them, embeddings or lm_head."""
    n = 0
    for name, mod in model.named_modules():
        if name.startswith("model.layers.") and isinstance(mod, (nn.Linear, QuantLinear)):
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                n += t.numel() * t.element_size()
    return n


# ---- the training step -----------------------------------------------------------------------

def make_batch(batch: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = [seq_len] * batch
    ids = torch.randint(10, vocab, (batch * seq_len + 1,), generator=g)
    return Batch(input_ids=ids[:-1].to(device), positions=positions_from_lengths(lengths, device),
                 cu_seqlens=cu_seqlens_from_lengths(lengths, device), targets=ids[1:].to(device))


def train_step(model: CausalLM, batch: Batch, params: list[nn.Parameter], attn_backend: str) -> float:
    """One forward+backward as the trainer runs it; returns the loss. Gradients are dropped
    first (set to None) so every step allocates them the same way."""
    for p in params:
        p.grad = None
    attn = AttnBatch.packed(batch.cu_seqlens, backend=attn_backend)  # fresh per step, as the trainer
    hidden = model(batch.input_ids, batch.positions, attn)  # [T, D]
    lp = token_logprobs(model, hidden, batch.targets)  # [T] float32
    loss = -lp.mean()
    loss.backward()
    return float(loss.detach())  # host sync, like the trainer's metric reads


def time_steps(model: CausalLM, aset: AdapterSet, batch: Batch, cfg: RunCfg) -> dict:
    """Warm up, then time each step; peak memory is taken over the timed steps only."""
    params = aset.trainable_parameters()
    loss = float("nan")
    for _ in range(cfg.warmup):
        loss = train_step(model, batch, params, cfg.attn_backend)
    got = sum(p.grad is not None for p in params)
    if cfg.warmup and got == 0:
        raise RuntimeError("backward produced no adapter gradients")
    _sync(cfg.device)
    _reset_peak(cfg.device)
    times = []
    for _ in range(cfg.iters):
        t0 = time.perf_counter()
        loss = train_step(model, batch, params, cfg.attn_backend)
        _sync(cfg.device)
        times.append(time.perf_counter() - t0)
    if not math.isfinite(loss):  # random weights gone wrong: the timing would mean nothing
        raise RuntimeError(f"loss is {loss}")
    step = statistics.median(times)
    return {"step_s": step, "step_s_min": min(times), "tokens_per_s": batch.num_tokens / step,
            "peak_bytes": _peak(cfg.device), "loss": loss}


def run_row(build: Callable[[], CausalLM], lora_targets: tuple[str, ...], grad_ckpt: bool,
            batch_size: int, seq_len: int, cfg: RunCfg) -> dict:
    """Build, inject, time and measure one row; everything it allocates dies with it."""
    _reset_peak(cfg.device)
    t0 = time.perf_counter()
    model = build()
    base_bytes = base_weight_bytes(model)
    aset = add_lora(model, lora_targets, cfg)
    model.gradient_checkpointing = grad_ckpt
    _free(cfg.device)
    _sync(cfg.device)
    build_s = time.perf_counter() - t0
    resident, build_peak = _allocated(cfg.device), _peak(cfg.device)
    batch = make_batch(batch_size, seq_len, model.config.vocab_size, cfg.device)
    st = time_steps(model, aset, batch, cfg)
    # What the step adds on top of the model: activations, logits chunks, grads, transients.
    st["step_extra_bytes"] = None if resident is None else st["peak_bytes"] - resident
    return {"batch": batch_size, "seq_len": seq_len, "tokens": batch.num_tokens,
            "lora_r": cfg.lora_r, "lora_modules": len(aset.modules),
            "trainable_params": aset.num_trainable(), **st,
            "base_weight_bytes": base_bytes, "resident_bytes": resident,
            "build_peak_bytes": build_peak, "build_s": build_s}


# ---- report ----------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.3g}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def table(rows: list[dict]) -> str:
    head = ("| section | shape | base | ckpt | tokens | step ms | tokens/s | vs bf16 (moe: vs loop) | base GiB "
            "| base vs bf16 | resident GiB | peak GiB | peak - resident GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    errors = []
    for r in rows:
        if "error" in r:
            errors.append(f"- {r['section']} {r.get('shape')} {r.get('format')} "
                          f"ckpt={r.get('grad_ckpt')}: ERROR {r['error']}")
            continue
        lines.append(
            f"| {r['section']}{'/' + r['experts'] if 'experts' in r else ''} | {r['shape']} | {r['format']} "
            f"| {'on' if r['grad_ckpt'] else 'off'} "
            f"| {r['tokens']} | {1e3 * r['step_s']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {_x(r.get('speed_vs_bf16', r.get('speed_vs_loop')))} | {_gib(r['base_weight_bytes'])} "
            f"| {_x(r.get('base_bytes_vs_bf16'))} | {_gib(r['resident_bytes'])} | {_gib(r['peak_bytes'])} "
            f"| {_gib(r['step_extra_bytes'])} |")
    return "\n".join(lines + errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (default without CUDA)")
    ap.add_argument("--sections", default="dense,moe")
    ap.add_argument("--shapes", default=None, help="dense shapes (default qwen3-1.7b,qwen3-4b)")
    ap.add_argument("--formats", default="bf16,int4", help="dense base formats; bf16 is the reference")
    ap.add_argument("--grad-ckpt", default="off", help="comma list of off/on: activation checkpointing")
    ap.add_argument("--batch", type=int, default=8, help="dense: sequences per packed batch")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--moe-shape", default="qwen3-30b-a3b")
    ap.add_argument("--moe-format", default="int4")
    ap.add_argument("--moe-batch", type=int, default=4)
    ap.add_argument("--moe-seq-len", type=int, default=1024)
    ap.add_argument("--moe-iters", type=int, default=3)
    ap.add_argument("--moe-lora-experts", action="store_true", help="LoRA on every expert linear too")
    ap.add_argument("--moe-experts", default="loop",
                    help="comma list of loop/fused: per-expert loop or the grouped Triton kernel "
                         "(orbit.kernels.moe_gemm; CUDA only)")
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--lora-alpha", type=float, default=64.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--attn-backend", default="sdpa", choices=("sdpa", "varlen"),
                    help="packed attention backend (the trainer uses sdpa)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16  # "bf16 base" means bf16 weights on CPU too, so byte ratios are real
    sections = set(args.sections.split(","))
    formats = ["bf16"] + [f for f in args.formats.split(",") if f != "bf16"]
    ckpts = [{"off": False, "on": True}[c] for c in args.grad_ckpt.split(",")]
    if small:
        shapes = ["tiny-qwen3", "tiny-llama"]
        moe_shape, (bsz, slen), (mbsz, mslen) = "tiny-moe", (2, 64), (2, 32)
        warmup, iters, moe_iters = 1, 2, 2
    else:
        shapes = args.shapes.split(",") if args.shapes else ["qwen3-1.7b", "qwen3-4b"]
        moe_shape, (bsz, slen), (mbsz, mslen) = args.moe_shape, (args.batch, args.seq_len), \
            (args.moe_batch, args.moe_seq_len)
        warmup, iters, moe_iters = args.warmup, args.iters, args.moe_iters
    cfg = RunCfg(device, dtype, args.lora_r, args.lora_alpha, warmup, iters, args.attn_backend)
    rows: list[dict] = []
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "dtype": str(dtype), "small": small, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "warmup": warmup, "iters": iters, "attn_backend": args.attn_backend,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(json.dumps(meta), flush=True)

    if "dense" in sections:
        for ck in ckpts:
            for shape in shapes:
                ref: dict | None = None  # the bf16 row of this shape
                for fmt in formats:
                    where = {"section": "dense", "shape": shape, "format": fmt, "grad_ckpt": ck}
                    r = _attempt(rows, where, device, run_row,
                                 lambda s=shape, f=fmt: dense_model(s, f, device, dtype),
                                 LORA_TARGETS, ck, bsz, slen, cfg)
                    if r is None:
                        continue
                    row = {**where, **r}
                    if fmt == "bf16":
                        ref = row
                    elif ref is not None:
                        row["speed_vs_bf16"] = row["tokens_per_s"] / ref["tokens_per_s"]
                        row["base_bytes_vs_bf16"] = row["base_weight_bytes"] / ref["base_weight_bytes"]
                    _emit(rows, row)

    if "moe" in sections:
        lora_t = ATTN_TARGETS + (EXPERT_TARGETS if args.moe_lora_experts else ())
        mcfg = RunCfg(device, dtype, args.lora_r, args.lora_alpha, warmup, moe_iters, args.attn_backend)
        for ck in ckpts:
            loop_row: dict | None = None
            for experts in args.moe_experts.split(","):
                if experts not in ("loop", "fused"):
                    raise SystemExit(f"--moe-experts: {experts!r} is not loop or fused")
                where = {"section": "moe", "shape": moe_shape, "format": args.moe_format, "grad_ckpt": ck,
                         "lora_targets": list(lora_t), "experts": experts}
                r = _attempt(rows, where, device, run_row,
                             lambda e=experts: _moe_with(moe_model(moe_shape, args.moe_format, device, dtype), e),
                             lora_t, ck, mbsz, mslen, mcfg)
                if r is None:
                    continue
                row = {**where, **r}
                if experts == "loop":
                    loop_row = row
                elif loop_row is not None:
                    row["speed_vs_loop"] = row["tokens_per_s"] / loop_row["tokens_per_s"]
                _emit(rows, row)

    out = {"meta": meta, "rows": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_train.json").write_text(json.dumps(out, indent=1))
    print(f"\n# bench_train on {meta['device']} ({'small' if small else 'full'}, {dtype}, "
          f"LoRA r{args.lora_r}, attn {args.attn_backend})\n")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
