"""Benchmark the native rollout engine: against transformers `generate`, against the memory
roofline, and across base precisions. Random weights (speed does not depend on them).

1. vs_hf: Orbit tokens/s vs transformers `generate` (bf16, sampling at temperature 1, EOS
   ignored so both produce exactly batch x new tokens) at batch 64 x 256 new tokens, for the
   SmolLM2-135M and Qwen3-1.7B shapes. Same weights in both (Orbit loads the HF state dict).
2. roofline: batch-1 decode of Qwen3-1.7B with an INT4 base vs the memory roofline: bytes
   read per token (every quantized linear's buffers, the bf16 LM head, norms, one embedding
   row, the KV cache at the mean context) / device copy bandwidth (measured in the same run).
3. formats: decode tokens/s at batch 1/16/64/256 for bf16/int4/fp8/nvfp4 bases (quantized
   with orbit.quant.convert.convert_linears).
4. lora: what RL rollouts run: the INT4 (--lora-format) Qwen3-1.7B base with a LoRA adapter
   (r 16, all seven linears, random nonzero B) served from slot 1, decode tokens/s at
   --batches (1/16/64/256) with the
   plain LoRA forward, the adapter's decode groups with separate shrink and expand-add
   launches, the groups with the expand-add folded into the base launch's store, and with the
   shrink inside the decode GEMV as well (Engine(fuse_lora=...),
   --fuse-lora on|off|both; both adds fold-chain: also the batch-1 MLP as one persistent
   launch with the deltas inside, gemv_chain.CHAIN_LORA) and, in the same run, the base alone
   (adapter off) and an OFT adapter (block 32, all seven linears).
Orbit's bf16 model (--orbit-bf16): "linear" keeps plain nn.Linear layers; "ql" converts them to
BF16 QuantLinears, the layers the trainer loads for `--quant-format bf16` (the bf16 launcher),
whose q/k/v and gate/up run as one GEMM each in the engine (orbit.quant.siblings).
roofline/formats take --split-kv, --fuse-siblings, --overlap and --pdl (Engine options) as on, off or
both (off then on, in the same run).

Each Orbit run is done twice: the first captures the CUDA graphs, the second is timed.
"Total" tokens/s divides all new tokens by the whole generate (prefill included); "decode"
counts only decode steps. On a CPU (or with --small) every section runs on tiny shapes.
--attn-backend: sdpa or varlen runs every Orbit engine with that backend; auto (default)
lets each engine pick (varlen where it runs natively, see orbit.models.attention), and
vs_hf then times both sdpa and varlen when varlen is native. Each variant runs in its own
try: a failure is printed (traceback on stderr) and recorded as an "error" row, the others
still run, and the exit status is 1 if any failed.
Prints JSON rows as it goes, a table last; writes $OUT/bench_engine.json (or --out).

    python scripts/bench/bench_engine.py [--small] [--sections vs_hf,roofline,formats,lora]
        [--attn-backend auto|sdpa|varlen|triton] [--split-kv|--fuse-siblings|--overlap|--pdl on|off|both]
        [--orbit-bf16 linear|ql|both]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from knobs import fixed_knob, knob_values, set_knob  # (scripts/bench: the script's own directory)

from orbit.kernels import gemv as gemv_mod
from orbit.kernels import pdl as pdl_mod
from orbit.models.attention import varlen_supported
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

COPY_GBS_H100 = 2990.0  # H100 device-to-device copy (GB/s); off CUDA the roofline uses this


def copy_bandwidth_gbs() -> float:
    """This GPU's copy bandwidth, measured as bench_qmm measures it (imported here only on
    CUDA: bench_qmm is a GPU benchmark)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_qmm import copy_gbs

    return copy_gbs()


SHAPES = {
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
                         "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                         "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                         "max_position_embeddings": 8192, "tie_word_embeddings": True},
    "qwen3-1.7b": {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                       "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                       "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                       "max_position_embeddings": 40960, "tie_word_embeddings": True},
    "tiny-llama": {"architectures": ["LlamaForCausalLM"], "vocab_size": 2048, "hidden_size": 128,
                       "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                       "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "tiny-qwen3": {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 2048, "hidden_size": 128,
                       "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 32, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                       "max_position_embeddings": 2048, "tie_word_embeddings": True},
}


def _emit(rows: list[dict], row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


def _attempt(rows: list[dict], where: dict, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw), or None after recording its exception as an error row `where` (and
    its traceback on stderr), so one failing variant does not lose the rest of the table."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # noqa: BLE001 - reported in the row and on stderr, not dropped
        traceback.print_exc()
        _emit(rows, {**where, "error": f"{type(e).__name__}: {e}"})
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


PLANE_TILE_DEFAULT = (gemv_mod.PLANES_BLOCK_N_SMALL_M, gemv_mod.GEMV_MAX_SPLIT,
                      gemv_mod.PLANES_M1_UNSPLIT, gemv_mod.PLANES_BLOCK_N_M1_UNSPLIT)


FOLD_NORM_RUNS = {"off": [False], "on": [True], "epilogue": ["epilogue"],
                  "prologue": ["prologue"], "both": [False, True]}


def parse_fold_norm(spec: str) -> list[bool | str]:
    """--fold-norm: a comma list of FOLD_NORM_RUNS names -> the Engine(fold_norm=...) runs."""
    runs: list[bool | str] = []
    for name in spec.split(","):
        if name not in FOLD_NORM_RUNS:
            raise SystemExit(f"--fold-norm: {name!r} is not one of {sorted(FOLD_NORM_RUNS)}")
        runs += FOLD_NORM_RUNS[name]
    return runs


def set_plane_tile(spec: str) -> None:
    """--plane-tiles: one run's M <= 4 plane GEMV tile rule (see the flag's help) into the
    gemv module's heuristic constants, read by pick_gemv_config when the engine captures its
    graphs."""
    bn, most, unsplit, bn1 = PLANE_TILE_DEFAULT
    head, _, s = spec.partition("s")
    if spec == "split":
        unsplit = False
    elif spec != "default":
        if not head.startswith("bn") or not head[2:].isdigit() or (s and not s.isdigit()):
            raise SystemExit(f"--plane-tiles: {spec!r} is not default, split, bnX or bnXsY")
        if s:
            bn, most, unsplit = int(head[2:]), int(s), False
        else:
            unsplit, bn1 = True, int(head[2:])
    (gemv_mod.PLANES_BLOCK_N_SMALL_M, gemv_mod.GEMV_MAX_SPLIT, gemv_mod.PLANES_M1_UNSPLIT,
     gemv_mod.PLANES_BLOCK_N_M1_UNSPLIT) = bn, most, unsplit, bn1


def hf_model(shape: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(SHAPES[shape])
    arch = d.pop("architectures")[0]
    cfg = AutoConfig.for_model("qwen3" if arch.startswith("Qwen3") else "llama", **d)
    cfg.architectures = [arch]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def orbit_model(shape: str, dtype: torch.dtype, device: str, hf: torch.nn.Module | None = None) -> CausalLM:
    """Orbit's CausalLM of `shape`; with `hf`, the same weights (module names match HF's)."""
    cfg = ModelConfig.from_hf_dict(dict(SHAPES[shape]))
    with torch.device(device):
        model = CausalLM(cfg)
    model = model.to(dtype).requires_grad_(False)
    model.model.rotary_emb.reset(device)  # RoPE tables stay float32
    if hf is not None:
        missing, unexpected = model.load_state_dict(hf.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
        if missing or [k for k in unexpected if "rotary" not in k]:
            raise RuntimeError(f"HF -> Orbit state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def run_orbit(model: CausalLM, ps: list[list[int]], new: int, device: str, **kw) -> dict:
    """Engine stats of the timed run, plus the backend the engine resolved."""
    eng = Engine(model, max_num_seqs=len(ps), max_model_len=len(ps[0]) + new + 1, device=device, **kw)
    try:
        sp = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True, seed=0)
        eng.generate(ps, sp)  # warm-up: captures the CUDA graphs for every bucket this run needs
        out = eng.generate(ps, sp)
        assert all(len(c.tokens) == new for r in out for c in r)
        return {**eng.last_stats, "attn_backend": eng.attn_backend}
    finally:
        eng.release_kv_cache()


def run_hf(model: torch.nn.Module, ps: list[list[int]], new: int, device: str) -> dict:
    ids = torch.tensor(ps, device=device)
    kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "pad_token_id": 0,
              "attention_mask": torch.ones_like(ids)}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        _sync(device)
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        _sync(device)
        dt = time.perf_counter() - t
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    assert out.shape[1] - ids.shape[1] == new, out.shape
    return {"seconds": dt, "new_tokens": n, "tokens_per_s": n / dt}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bytes_per_decode_token(model: CausalLM, context: int) -> int:
    """Weight + KV bytes one batch-1 decode step reads."""
    cfg = model.config
    n = 0
    for name, mod in model.named_modules():
        if type(mod).__name__ == "QuantLinear" or (isinstance(mod, torch.nn.Linear) and name != "lm_head"):
            n += sum(b.numel() * b.element_size() for b in mod.buffers(recurse=False))
            n += sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
        elif isinstance(mod, torch.nn.RMSNorm) or type(mod).__name__ == "RMSNorm":
            n += mod.weight.numel() * mod.weight.element_size()
    head = model.lm_head.weight
    n += head.numel() * head.element_size() + cfg.hidden_size * head.element_size()  # head + 1 embedding row
    kv_elem = torch.empty(0, dtype=head.dtype).element_size()
    n += 2 * cfg.num_layers * context * cfg.num_kv_heads * cfg.head_dim * kv_elem
    return n


def _format_model(shape: str, fmt: str, dtype: torch.dtype, device: str) -> CausalLM:
    """A random model of `shape` with its linears converted to `fmt` (bf16: plain nn.Linear;
    "bf16-ql": BF16 QuantLinears, what `--quant-format bf16` loads)."""
    from orbit.quant.convert import convert_linears

    model = orbit_model(shape, dtype, device)
    if fmt != "bf16":
        convert_linears(model, "bf16" if fmt == "bf16-ql" else fmt)
    return model


LORA_RANK = 16
OFT_BLOCK = 32


def lora_section(rows: list[dict], shape: str, small: bool, dtype: torch.dtype, device: str,
                 plen: int, fuse: str, okw: dict, fmt: str = "int4",
                 batches: tuple[int, ...] = (1, 16, 64, 256),
                 knobs: tuple[str | None, ...] = (None,),
                 kinds: tuple[str, ...] = ("lora", "oft")) -> None:
    """Section 4 (see the module docstring): the base alone, LoRA with the plain forward, LoRA
    with the decode groups, and OFT (block 32; its per-input rotation leaves the base sibling
    groups off), each adapter served from slot 1, on a `fmt` base; every variant once per
    --knob value (set before the engine captures its graphs)."""
    from orbit.adapters.inject import AdapterConfig, inject_adapters
    from orbit.adapters.lora_decode import link_lora_decode, unlink_lora_decode
    from orbit.kernels import gemv_chain

    new = 32 if small else 128
    # plain: LoRALinear.forward; groups: the decode groups' shrink + expand-add after the base
    # launch; fold-store: the expand-add in the base launch's store, the shrink separate; fold:
    # also the shrink inside the plane / FP8 decode GEMVs (what the engine does); fold-chain:
    # also the batch-1 MLP as one persistent launch with the deltas inside
    # (gemv_chain.CHAIN_LORA, off by default until measured)
    fuses = {"on": ["fold"], "off": ["plain"],
             "both": ["plain", "groups", "fold-store", "fold", "fold-chain"]}[fuse]
    for kind in kinds:
        model = _format_model(shape, fmt, dtype, device)
        cfg = AdapterConfig(kind=kind, r=LORA_RANK, alpha=2.0 * LORA_RANK, block_size=OFT_BLOCK)
        aset = inject_adapters(model, cfg)
        with torch.no_grad():  # a trained-looking adapter (PEFT's init is the identity map)
            for mod in aset.modules.values():
                t = mod.lora_B if kind == "lora" else mod.oft_R
                t.normal_(0.0, 0.01)
        aset.stage(0, 1)
        variants = [(1, f) for f in fuses] if kind == "lora" else [(1, "plain")]
        if kind == "lora":
            variants = [(None, "plain"), *variants]  # the base alone, same model
        for batch in ([1, 4] if small else batches):
            ps = prompts(batch, plen, SHAPES[shape]["vocab_size"], seed=batch)
            for (slot, fz), kv in [(v, k) for v in variants for k in knobs]:
                set_knob(kv)
                aset.set_active(slot)
                unlink_lora_decode(model)
                if fz in ("groups", "fold-store"):  # linked here; fuse_lora=False leaves them
                    link_lora_decode(model, fold=fz != "groups", fold_shrink=False)
                w = {"section": "lora", "shape": shape, "format": fmt, "batch": batch,
                     "new_tokens": new, "adapter": None if slot is None else kind,
                     "rank": LORA_RANK, "fuse_lora": fz, "knob": kv}
                gemv_chain.CHAIN_LORA = fz == "fold-chain"
                st = _attempt(rows, w, run_orbit, model, ps, new, device,
                              fuse_lora=fz in ("fold", "fold-chain"), **okw)
                gemv_chain.CHAIN_LORA = False
                if st is not None:
                    _emit(rows, {**w, "attn_backend": st["attn_backend"],
                                 "tokens_per_s": st["tokens_per_s"],
                                 "decode_tokens_per_s": st["decode_tokens_per_s"]})
        del model, aset
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (default without CUDA)")
    ap.add_argument("--sections", default="vs_hf,roofline,formats,lora")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128,
                    help="decode tokens per sample in the roofline and formats sections "
                         "(longer runs: less noise between knob values)")
    ap.add_argument("--attn-backend", default="auto", choices=("auto", "sdpa", "varlen", "triton"),
                    help="engine attention backend; auto: each engine picks (varlen where "
                         "native), and vs_hf times sdpa and varlen")
    # Engine options timed as on, off or both (off then on, same run) in roofline/formats.
    for flag, default, what in (
            ("--split-kv", "on", "Engine(split_kv=...) (split-KV decode attention)"),
            ("--fuse-siblings", "on", "grouped q/k/v and gate/up GEMVs (orbit.quant.siblings)"),
            ("--overlap", "on", "Engine(overlap=...) (launch step t+1 before reading step t's "
                                "tokens)"),
            ("--pdl", "on", "Engine(pdl=...) (programmatic dependent launch of the decode "
                            "kernels, sm_90+)"),
            ("--fold-rope", "off", "Engine(fold_rope=...) (q/k norm + RoPE + cache write inside "
                                  "the decode attention launch)"),
            ("--chain-mlp", "off", "Engine(chain_mlp=...) (batch-1 MLP as one persistent "
                                   "launch, orbit/kernels/gemv_chain.py)"),
            ("--prefetch-weights", "off", "Engine(prefetch_weights=...) (experimental: each "
                                          "decode attention launch prefetches the layer's "
                                          "next GEMV weights into L2)"),
            ("--fuse-lora", "both", "lora section: Engine(fuse_lora=...) (LoRA decode groups; "
                                    "both = plain forward, groups with separate launches, the "
                                    "expand-add in the base launch, and the shrink too)"),
            ("--l2-prefetch", "off", "with PDL, the GEMVs prefetch their first steps' weights "
                                     "into L2 before waiting (gemv.PDL_L2_PREFETCH)"),
            ("--nibble-decodes", "on", "the plane GEMV's NVFP4 E2M1 decode as fp32 bits "
                                       "(gemv.NVFP4_FP32_DECODE; off: the fp16 decode)")):
        ap.add_argument(flag, default=default, choices=("on", "off", "both"),
                        help=f"roofline/formats: {what}; both = off then on, same run")
    ap.add_argument("--fold-norm", default="prologue",
                    help="roofline/formats: comma list of runs, each Engine(fold_norm=...) "
                         "(default: the Engine's, prologue): off; "
                         "on or epilogue (residual add + RMSNorm inside the o_proj / down_proj "
                         "decode GEMV); prologue (inside the q/k/v and gate/up GEMVs that read "
                         "the normed row, orbit/kernels/norm_prologue.py); both = off,on")
    ap.add_argument("--w-preload", default="0",
                    help="roofline/formats: comma list of runs, each gemv.PDL_W_PRELOAD (the "
                         "plane GEMVs' first 0-2 K steps of weights loaded before the PDL "
                         "wait), 'r' appended for pdl.EARLY_RELEASE (every PDL kernel "
                         "releases the next before its own wait), e.g. 0,1,2r")
    ap.add_argument("--plane-tiles", default="default",
                    help="roofline/formats: comma list of runs, each a plane GEMV tile rule: "
                         "'default'; 'split' (gemv.PLANES_M1_UNSPLIT off: INT4 at M = 1 split "
                         "K as the other formats do); bnX (unsplit INT4 M = 1, X-row tiles "
                         "where 32-row ones leave the SMs under-filled: "
                         "gemv.PLANES_BLOCK_N_M1_UNSPLIT); bnXsY (the split rule with X-row "
                         "tiles at M <= 4 and at most Y K-slices), e.g. split,bn16,bn8")
    ap.add_argument("--batches", default="1,16,64,256",
                    help="formats and lora sections: these batch sizes (the roofline row is "
                         "batch 1)")
    ap.add_argument("--knob", default=None,
                    help="roofline/formats/lora: one module constant swept over runs, as "
                         "MODULE.NAME=V1,V2,... (Python literals), e.g. "
                         "orbit.kernels.attention_decode.SPLIT_MAX=16,1,2; each run sets it "
                         "before the engine captures its graphs (the last run's value stays "
                         "set)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=V",
                    help="a module constant fixed for every run (repeatable), e.g. "
                         "orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8 under a --knob sweep of "
                         "another constant")
    ap.add_argument("--orbit-bf16", default="both", choices=("linear", "ql", "both"),
                    help="how Orbit's bf16 model holds its linears: plain nn.Linear, or BF16 "
                         "QuantLinears (what --quant-format bf16 loads: grouped q/k/v and "
                         "gate/up GEMMs in the engine); both: linear then ql, same run")
    ap.add_argument("--dequant-min-m", type=int, default=None,
                    help="fast mode's dequantize-then-cuBLAS threshold (_qgemm.dequant_min_m) "
                         "for this run, every format: rows from which quantized linears (and so the LoRA "
                         "fold's reach) switch from the tl.dot loop to a BF16 copy + cuBLAS")
    ap.add_argument("--qmm-routes", default="",
                    help="route table from `python -m orbit tune-qmm` for every run (default: "
                         "the process's own resolution, docs/kernels.md 'Measured routes')")
    ap.add_argument("--qmm-routes-compare", action="store_true",
                    help="roofline/formats: each configuration with the built-in rules, then "
                         "with --qmm-routes' table, same run")
    ap.add_argument("--lora-format", default="int4", choices=("int4", "fp8", "nvfp4"),
                    help="lora section: the base's format")
    ap.add_argument("--adapter-kinds", default="lora,oft",
                    help="lora section: these adapters (lora: the base alone too; oft)")
    ap.add_argument("--formats", default="",
                    help="roofline/formats: only these bases, comma-separated (bf16, bf16-ql, "
                         "int4, fp8, nvfp4; default all)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"vs_hf", "roofline", "formats", "lora"}
    if unknown:
        ap.error(f"--sections: {sorted(unknown)} not among vs_hf, roofline, formats, lora")
    for spec in args.set:  # before any model is built or graph captured
        set_knob(fixed_knob(spec))
    from orbit.kernels.qmm_routes import ROUTES, load_routes

    routes = load_routes(args.qmm_routes) if args.qmm_routes else None
    if args.qmm_routes_compare and routes is None:
        ap.error("--qmm-routes-compare needs --qmm-routes FILE")
    # (label, table or None = rules only) per run; [(default resolution)] without the flags
    route_runs = ([("rules", None), ("table", routes)] if args.qmm_routes_compare else
                  [("table", routes)] if routes is not None else [("default", "default")])
    if routes is not None and not args.qmm_routes_compare:
        ROUTES.install(routes)  # the lora and vs_hf sections too
    if args.dequant_min_m is not None:
        from orbit.kernels import _qgemm

        _qgemm.DEQUANT_MIN_M, _qgemm.DEQUANT_MIN_M_BY_FMT = args.dequant_min_m, {}
    bf16_variants = {"linear": ["linear"], "ql": ["ql"], "both": ["linear", "ql"]}[args.orbit_bf16]
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    sections = set(args.sections.split(","))
    plen = 16 if small else args.prompt_len
    # All benchmark shapes are GQA; "native" = the engine's "auto" would pick varlen.
    native = cuda and dtype in (torch.bfloat16, torch.float16) and varlen_supported(
        device, cached=True, gqa=True)
    if args.attn_backend == "auto":
        vs_backends = ["sdpa", "varlen"] if native else ["sdpa"]
    else:
        vs_backends = [args.attn_backend]
    rows: list[dict] = []
    okw = {"attn_backend": args.attn_backend}
    copy_gbs = copy_bandwidth_gbs() if cuda else COPY_GBS_H100
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu", "copy_GBps": copy_gbs,
            "torch": torch.__version__,
            "dtype": str(dtype), "small": small, "prompt_len": plen,
            "attn_backend": args.attn_backend, "varlen_native": native,
            "dequant_min_m": args.dequant_min_m,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(json.dumps(meta), flush=True)

    if "vs_hf" in sections:
        batch, new = (4, 16) if small else (64, 256)
        for shape in (["tiny-llama", "tiny-qwen3"] if small else ["smollm2-135m", "qwen3-1.7b"]):
            where = {"section": "vs_hf", "shape": shape, "batch": batch, "new_tokens": new}
            ps = prompts(batch, plen, SHAPES[shape]["vocab_size"])
            hf = _attempt(rows, {**where, "stage": "hf_model"}, hf_model, shape, dtype, device)
            h = None if hf is None else _attempt(rows, {**where, "stage": "hf_generate"},
                                                 run_hf, hf, ps, new, device)
            # Orbit still runs when HF failed (random weights of the same shape, no speedup).
            om = _attempt(rows, {**where, "stage": "orbit_model"}, orbit_model, shape, dtype,
                          device, hf)
            del hf
            for variant in bf16_variants if om is not None else []:
                if variant == "ql":  # in place, after the plain-linear runs
                    from orbit.quant.convert import convert_linears

                    convert_linears(om, "bf16")
                for be in vs_backends:
                    o = _attempt(rows, {**where, "attn_backend": be, "orbit_bf16": variant},
                                 run_orbit, om, ps, new, device, attn_backend=be)
                    if o is None:
                        continue
                    hf_tps = h["tokens_per_s"] if h is not None else None
                    _emit(rows, {**where, "attn_backend": o["attn_backend"], "orbit_bf16": variant,
                                 "hf_tokens_per_s": hf_tps,
                                 "orbit_tokens_per_s": o["tokens_per_s"],
                                 "orbit_decode_tokens_per_s": o["decode_tokens_per_s"],
                                 "speedup": o["tokens_per_s"] / hf_tps if hf_tps else None})
            del om
            if cuda:
                torch.cuda.empty_cache()

    bf16_fmts = [{"linear": "bf16", "ql": "bf16-ql"}[v] for v in bf16_variants]
    fmts = [*bf16_fmts, "int4"] if small else [*bf16_fmts, "int4", "fp8", "nvfp4"]
    if args.formats:
        wanted = [f.strip() for f in args.formats.split(",") if f.strip()]
        unknown = set(wanted) - set(fmts)
        if unknown:
            ap.error(f"--formats: {sorted(unknown)} not among {fmts}")
        fmts = [f for f in fmts if f in wanted]
    qshape = "tiny-qwen3" if small else "qwen3-1.7b"
    fold_norm_runs = parse_fold_norm(args.fold_norm)
    if sections & {"roofline", "formats"}:
        for fmt in fmts:
            if fmt != "int4" and "formats" not in sections:
                continue
            model = _attempt(rows, {"section": "formats", "shape": qshape, "format": fmt,
                                    "stage": "model"}, _format_model, qshape, fmt, dtype, device)
            if model is None:
                continue
            if cuda:
                torch.cuda.empty_cache()
            new = 32 if small else args.new_tokens
            for batch in ([1, 4] if small else [int(b) for b in args.batches.split(",")]):
                if "formats" not in sections and batch != 1:
                    continue
                where = {"section": "formats", "shape": qshape, "format": fmt, "batch": batch,
                         "new_tokens": new}
                ps = prompts(batch, plen, SHAPES[qshape]["vocab_size"], seed=batch)
                # "both": off first (fusing re-homes the model's buffers for good)
                onoff = {"on": [True], "off": [False], "both": [False, True]}
                for fuse, split, ovl, pdl, l2p, pw, fr, nd, fn, cm, wp, pt, kv, (rlabel, rtable) in [
                        (f, s_, o, p, q, w_, fr_, nd_, fn_, cm_, wp_, pt_, kv_, rr)
                        for f in onoff[args.fuse_siblings]
                        for s_ in onoff[args.split_kv] for o in onoff[args.overlap]
                        for p in onoff[args.pdl] for q in onoff[args.l2_prefetch]
                        for w_ in onoff[args.prefetch_weights] for fr_ in onoff[args.fold_rope]
                        for nd_ in onoff[args.nibble_decodes] for fn_ in fold_norm_runs
                        for cm_ in onoff[args.chain_mlp]
                        for wp_ in args.w_preload.split(",")
                        for pt_ in args.plane_tiles.split(",")
                        for kv_ in knob_values(args.knob)
                        for rr in route_runs
                        if p or q == onoff[args.l2_prefetch][-1]]:  # (prefetch only with PDL)
                    w = {**where, "fuse_siblings": fuse, "split_kv": split, "overlap": ovl,
                         "pdl": pdl, "l2_prefetch": pdl and l2p, "prefetch_weights": pw,
                         "fold_rope": fr, "nibble_decodes": nd, "fold_norm": fn,
                         "chain_mlp": cm, "w_preload": wp, "plane_tile": pt,
                         "knob": kv, "qmm_routes": rlabel}
                    set_plane_tile(pt)
                    set_knob(kv)
                    gemv_mod.PDL_L2_PREFETCH = l2p
                    gemv_mod.PDL_W_PRELOAD = int(wp.rstrip("r"))
                    pdl_mod.EARLY_RELEASE = wp.endswith("r")
                    gemv_mod.NVFP4_FP32_DECODE = nd
                    scope = (contextlib.nullcontext() if rlabel == "default"
                             else ROUTES.scoped(rtable))
                    with scope:  # the engine captures its graphs inside: the routes they hold
                        st = _attempt(rows, w, run_orbit, model, ps, new, device,
                                      fuse_siblings=fuse, split_kv=split, overlap=ovl, pdl=pdl,
                                      prefetch_weights=pw, fold_rope=fr, fold_norm=fn,
                                      chain_mlp=cm, **okw)
                    if st is None:
                        continue
                    row = {**w, "attn_backend": st["attn_backend"],
                           "tokens_per_s": st["tokens_per_s"],
                           "decode_tokens_per_s": st["decode_tokens_per_s"]}
                    if fmt == "int4" and batch == 1 and "roofline" in sections:
                        b = bytes_per_decode_token(model, plen + new // 2)
                        roof = copy_gbs * 1e9 / b
                        _emit(rows, {"section": "roofline", "shape": qshape, "format": fmt,
                                     "qmm_routes": rlabel, "fold_rope": fr,
                                     "nibble_decodes": nd, "fold_norm": fn,
                                     "chain_mlp": cm, "w_preload": wp, "plane_tile": pt,
                                     "knob": kv,
                                     "attn_backend": st["attn_backend"], "fuse_siblings": fuse,
                                     "split_kv": split, "overlap": ovl, "pdl": pdl,
                                     "l2_prefetch": pdl and l2p, "prefetch_weights": pw,
                                     "bytes_per_token": b, "copy_GBps": copy_gbs,
                                     "roofline_tokens_per_s": roof,
                                     "decode_tokens_per_s": st["decode_tokens_per_s"],
                                     "fraction_of_roofline": st["decode_tokens_per_s"] / roof,
                                     "ms_per_token": 1e3 / st["decode_tokens_per_s"]})
                    if "formats" in sections:
                        _emit(rows, row)
            del model
            if cuda:
                torch.cuda.empty_cache()

    if "lora" in sections:
        _attempt(rows, {"section": "lora", "stage": "all"}, lora_section, rows, qshape, small,
                 dtype, device, plen, args.fuse_lora, okw, args.lora_format,
                 tuple(int(b) for b in args.batches.split(",")), tuple(knob_values(args.knob)),
                 tuple(args.adapter_kinds.split(",")))

    out = {"meta": meta, "rows": rows}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_engine.json").write_text(json.dumps(out, indent=1))
    print(f"\n# bench_engine on {meta['device']} ({'small' if small else 'full'}, {dtype}, "
          f"attn {args.attn_backend}, varlen native: {native})")
    for r in rows:
        if "error" in r:
            what = " ".join(f"{k}={r[k]}" for k in ("shape", "format", "batch", "attn_backend",
                                                    "stage") if k in r)
            print(f"{r['section']:<8} {what}: ERROR {r['error']}")
        elif r["section"] == "vs_hf":
            hf = r["hf_tokens_per_s"]
            hf_s = f"HF {hf:>9.1f} tok/s" if hf else "HF       n/a"
            sp = f"speedup {r['speedup']:.1f}x" if r["speedup"] else "speedup n/a"
            print(f"vs_hf    {r['shape']:<13} b{r['batch']:<3} x{r['new_tokens']:<4} {hf_s}"
                  f"  Orbit[{r['attn_backend']}, {r['orbit_bf16']}] {r['orbit_tokens_per_s']:>9.1f} tok/s  {sp}")
        elif r["section"] == "roofline":
            fz = (" grouped" if r.get("fuse_siblings") else " separate") + \
                (" split-kv" if r.get("split_kv") else "") + (" overlap" if r.get("overlap") else "") + \
                (" pdl" if r.get("pdl") else "") + (" l2pre" if r.get("l2_prefetch") else "") + \
                (" prefetch-weights" if r.get("prefetch_weights") else "") + \
                ("" if r.get("fold_rope", True) else " no-fold-rope") + \
                (" nibble-decodes" if r.get("nibble_decodes") else "") + \
                (f" fold-norm:{r['fold_norm']}" if r.get("fold_norm") else "") + \
                (" chain-mlp" if r.get("chain_mlp") else "") + \
                (f" w-preload{r['w_preload']}" if r.get("w_preload", "0") != "0" else "") + \
                (f" tile:{r['plane_tile']}" if r.get("plane_tile", "default") != "default" else "") + \
                (f" {r['knob']}" if r.get("knob") else "") + \
                (f" routes:{r['qmm_routes']}" if r.get("qmm_routes", "default") != "default" else "")
            print(f"roofline {r['shape']:<13} {r['format']:<5}{fz} b1: {r['decode_tokens_per_s']:.1f} tok/s"
                  f" ({r['ms_per_token']:.2f} ms) vs roofline {r['roofline_tokens_per_s']:.1f}"
                  f" = {100 * r['fraction_of_roofline']:.0f}% ({r['bytes_per_token'] / 1e6:.0f} MB/token)")
        elif r["section"] == "lora":
            what = ("adapter off" if r["adapter"] is None else
                    f"oft b{OFT_BLOCK}" if r["adapter"] == "oft" else
                    f"lora r{r['rank']} {r['fuse_lora']}")
            what += f" {r['knob']}" if r.get("knob") else ""
            print(f"lora     {r['shape']:<13} {r.get('format', 'int4')} {what:<20} b{r['batch']:<3}: decode "
                  f"{r['decode_tokens_per_s']:>9.1f} tok/s ({1e3 / r['decode_tokens_per_s']:.2f} ms/step)")
        else:
            fz = ("+grp" if r.get("fuse_siblings") else "") + ("+split" if r.get("split_kv") else "") + \
                ("+ovl" if r.get("overlap") else "") + ("+pdl" if r.get("pdl") else "") + \
                ("+l2pre" if r.get("l2_prefetch") else "") + ("+pfw" if r.get("prefetch_weights") else "") + \
                ("" if r.get("fold_rope", True) else "-rope") + \
                ("+nd" if r.get("nibble_decodes") else "") + \
                (f"+norm:{r['fold_norm']}" if r.get("fold_norm") else "") + \
                ("+chain" if r.get("chain_mlp") else "") + \
                (f"+wpre{r['w_preload']}" if r.get("w_preload", "0") != "0" else "") + \
                (f"+{r['plane_tile']}" if r.get("plane_tile", "default") != "default" else "") + \
                (f"+{r['knob']}" if r.get("knob") else "") + \
                (f"+{r['qmm_routes']}" if r.get("qmm_routes", "default") != "default" else "")
            print(f"formats  {r['shape']:<13} {r['format'] + fz:<9} b{r['batch']:<3}: total {r['tokens_per_s']:>9.1f}"
                  f" tok/s, decode {r['decode_tokens_per_s']:>9.1f} tok/s [{r['attn_backend']}]")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
