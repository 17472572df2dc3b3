"""`python -m orbit.preflight`: check train-vs-rollout log-prob alignment before a run.

Takes the training command line (the same argument groups as `python -m orbit.train`, from
orbit/config.py), loads the configured model, precision and adapter, samples a few prompts
with the engine, re-scores them on the trainer path, prints the mismatch metrics and exits
non-zero with a message when the mismatch exceeds the bound for the mode:

- exact mode: every token's two log-probs must be bitwise equal (bound 0);
- fast mode: mean |dlogp| and KL k3 under `fast_bounds(precision)`. The bounds sit about 3x
  above what docs/precision.md measured in fast mode and below the conventional
  BF16-trainer/quantized-sampler setup, so they catch a broken setup (stale adapter slot,
  wrong kernel, NaNs) without flagging ordinary rounding.

The adapter gets random nonzero weights (a freshly initialised LoRA has B = 0 and would not
exercise the adapter path); `--no-preflight-random-adapter` keeps the initial values.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch

from orbit.alignment.measure import MismatchMetrics, measure_mismatch, random_prompts
from orbit.config import TrainConfig, build_parser, config_from_namespace
from orbit.models.dtypes import resolve_compute_dtype
from orbit.orchestration.placement import resolve_device

# Fast-mode gate (mean |dlogp|, KL k3), per precision; see docs/precision.md ("Alignment") for
# the H100 measurements behind them: random Qwen3-1.7B-shaped model, bf16 + LoRA, 28 layers:
# 0.053 / 2.8e-3; weight-only formats at 4 layers 0.015-0.023 / 6-9e-4; W8A8 (activations
# rounded to fp8 per token, so a rounding flip moves a whole row) 0.10 / 1.5e-2 at 4 layers.
FAST_BOUNDS = {"default": (0.15, 1e-2), "fp8-w8a8": (0.5, 8e-2)}
FAST_MEAN_ABS_BOUND, FAST_KL_K3_BOUND = FAST_BOUNDS["default"]


def fast_bounds(precision: str) -> tuple[float, float]:
    """(mean |dlogp| bound, KL k3 bound) of fast mode for a `--quant-format`."""
    return FAST_BOUNDS.get(precision, FAST_BOUNDS["default"])
DEFAULT_PROMPTS = (
    "What is 17 + 25? Answer with a number.",
    "Write one sentence about the moon.",
    "List three prime numbers.",
    "Compute 12 * 11 and explain briefly.",
)
RANDOM_MODELS = ("tiny", "qwen3-1.7b")


@dataclass
class PreflightResult:
    metrics: MismatchMetrics
    mode: str
    ok: bool
    reason: str


def check_bounds(m: MismatchMetrics, mode: str, mean_abs_bound: float = FAST_MEAN_ABS_BOUND,
                 kl_k3_bound: float = FAST_KL_K3_BOUND) -> tuple[bool, str]:
    """(ok, message) for metrics `m` under `mode` ("exact" or "fast")."""
    if mode == "exact":
        if m.frac_diff == 0.0 and m.max_abs == 0.0:
            return True, f"exact mode: all {m.n_tokens} log-probs bitwise equal"
        return False, (f"exact mode promises bitwise-equal log-probs, but {m.frac_diff:.1%} of "
                       f"{m.n_tokens} tokens differ (max |dlogp| {m.max_abs:.3g}); some module "
                       "still runs a batch-variant kernel (see orbit.alignment.exact)")
    if mode != "fast":
        raise ValueError(f"mode must be 'fast' or 'exact', got {mode!r}")
    bad = []
    if not m.mean_abs <= mean_abs_bound:
        bad.append(f"mean |dlogp| {m.mean_abs:.3g} > {mean_abs_bound:.3g}")
    if not m.kl_k3 <= kl_k3_bound:
        bad.append(f"KL k3 {m.kl_k3:.3g} > {kl_k3_bound:.3g}")
    if bad:
        return False, "fast mode mismatch over its bound: " + "; ".join(bad)
    return True, f"fast mode: mismatch within bounds over {m.n_tokens} tokens"


def random_config(name: str) -> Any:
    """A ModelConfig for a random-weight smoke model (no checkpoint needed)."""
    from orbit.models.config import ModelConfig

    if name == "tiny":
        return ModelConfig(arch="Qwen3ForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True,
                           max_position_embeddings=512)
    if name == "qwen3-1.7b":
        return ModelConfig(arch="Qwen3ForCausalLM", vocab_size=151936, hidden_size=2048,
                           intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                           head_dim=128, qk_norm=True, rope_theta=1e6, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    raise ValueError(f"--preflight-random-model must be one of {RANDOM_MODELS}, got {name!r}")


def _load(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, random_model_name: str) -> tuple[Any, Any]:
    """(model with the configured precision, tokenizer or None)."""
    from orbit.alignment.variants import quantize_base, random_model

    fmt = cfg.precision.quant_format
    if random_model_name:
        model = random_model(random_config(random_model_name), device, dtype, seed=cfg.data.seed)
        quantize_base(model, "bf16" if fmt == "auto" else fmt,
                      cfg.precision.quant_group_size if fmt == "int4" else None)
        return model, None
    from orbit.models.loader import load_model

    path = cfg.ckpt.hf_checkpoint
    if not path:
        from orbit.assets import default_gguf_path

        path = str(default_gguf_path())
    load_fmt = "fp8" if fmt == "fp8-w8a8" else fmt
    model, tok = load_model(path, dtype=dtype, device=device,
                            quant=None if load_fmt == "auto" else load_fmt,
                            group_size=cfg.precision.quant_group_size if load_fmt in ("int4", "int8") else None)
    if fmt == "fp8-w8a8":
        from orbit.alignment.variants import W8A8Linear
        from orbit.quant.linear import QuantLinear

        for m in model.modules():
            if type(m) is QuantLinear and m.weight_format == "fp8":
                m.__class__ = W8A8Linear
    return model, tok


def _prompts(cfg: TrainConfig, tok: Any, num: int, vocab: int) -> list[list[int]]:
    """Token ids of `num` prompts: the first rows of --prompt-data when given, else built-in
    ones; random ids when the model has no tokenizer (random-weight smoke models)."""
    if tok is None:
        return random_prompts(num, vocab, seed=cfg.data.seed)
    if cfg.data.prompt_data:
        from orbit.data.jsonl import load_prompts

        ds = load_prompts(cfg.data.prompt_data, cfg.data.input_key, label_key=None, tokenizer=tok,
                          apply_chat_template=cfg.data.apply_chat_template, limit=num)
        texts = [r.text for r in ds.records]
        if not texts:
            raise ValueError(f"--prompt-data {cfg.data.prompt_data} has no rows")
        texts = (texts * num)[:num]
        return [list(tok.encode(t, add_special_tokens=False)) for t in texts]
    texts = (list(DEFAULT_PROMPTS) * num)[:num]
    if cfg.data.apply_chat_template and getattr(tok, "chat_template", None):
        from orbit.models.tokenizer import chat_prompt_ids

        return [chat_prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts]
    return [list(tok.encode(t, add_special_tokens=False)) for t in texts]


def run_preflight(cfg: TrainConfig, num_prompts: int = 4, max_new_tokens: int = 32, n: int = 2,
                  random_adapter: bool = True, random_model_name: str = "",
                  mean_abs_bound: float | None = None,
                  kl_k3_bound: float | None = None) -> PreflightResult:
    """Load, sample, score, compare; see the module docstring. Bounds default to
    `fast_bounds(--quant-format)`."""
    from orbit.adapters.inject import AdapterConfig, inject_adapters
    from orbit.alignment.exact import convert_exact
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    device = torch.device(resolve_device(cfg.cluster.device, torch.cuda.device_count()))
    dtype = resolve_compute_dtype(cfg.precision.compute_dtype, device)
    model, tok = _load(cfg, device, dtype, random_model_name)
    a = cfg.adapter
    torch.manual_seed(cfg.data.seed)
    aset = inject_adapters(model, AdapterConfig(kind=a.adapter, r=a.lora_rank, alpha=a.lora_alpha,
                                                use_rslora=a.use_rslora, block_size=a.oft_block_size,
                                                targets=tuple(a.target_modules)))
    if random_adapter:
        g = torch.Generator().manual_seed(cfg.data.seed + 1)
        with torch.no_grad():
            for name, p in aset.named_trainable_parameters():
                scale = 1.0 / p.shape[1] ** 0.5 if name.endswith("lora_A") else 0.02
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    aset.set_active(0)
    mode = cfg.precision.precision_mode
    if mode == "exact":
        convert_exact(model)
    from orbit.kernels.qmm_routes import install_from_path

    install_from_path(cfg.precision.qmm_routes)  # the kernels the run itself will take
    prompts = _prompts(cfg, tok, num_prompts, model.config.vocab_size)
    longest = max(len(p) for p in prompts) + max_new_tokens + 1
    engine = Engine(model, max_num_seqs=num_prompts * n, max_model_len=longest, device=device,
                    exact=mode == "exact", tokenizer=tok, seed=cfg.data.seed)
    temp = cfg.rollout.rollout_temperature if cfg.rollout.rollout_temperature > 0 else 1.0
    sampling = SamplingParams(temperature=temp, max_new_tokens=max_new_tokens, seed=cfg.data.seed,
                              ignore_eos=True)
    res = measure_mismatch(model, engine, prompts, sampling, n=n)
    default_mean, default_kl = fast_bounds(cfg.precision.quant_format)
    ok, reason = check_bounds(res.metrics, mode,
                              default_mean if mean_abs_bound is None else mean_abs_bound,
                              default_kl if kl_k3_bound is None else kl_k3_bound)
    return PreflightResult(res.metrics, mode, ok, reason)


def build_preflight_parser() -> argparse.ArgumentParser:
    parser = build_parser(prog="python -m orbit.preflight")
    g = parser.add_argument_group("preflight", "what the alignment check samples and its bounds")
    g.add_argument("--preflight-prompts", dest="preflight.prompts", type=int, default=4)
    g.add_argument("--preflight-samples", dest="preflight.n", type=int, default=2, help="completions per prompt")
    g.add_argument("--preflight-max-new-tokens", dest="preflight.max_new", type=int, default=32)
    g.add_argument("--preflight-random-adapter", dest="preflight.random_adapter",
                   action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--preflight-random-model", dest="preflight.random_model", default="",
                   choices=("",) + RANDOM_MODELS, help="random-weight model instead of a checkpoint")
    g.add_argument("--preflight-mean-abs-bound", dest="preflight.mean_abs", type=float, default=None,
                   help=f"fast-mode bound on mean |dlogp| (default per precision: {FAST_BOUNDS})")
    g.add_argument("--preflight-kl-bound", dest="preflight.kl", type=float, default=None,
                   help="fast-mode bound on KL k3 (default per precision)")
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_preflight_parser().parse_args(argv)
    extra = {k.split(".", 1)[1]: v for k, v in vars(ns).items() if k.startswith("preflight.")}
    for k in list(vars(ns)):
        if k.startswith("preflight."):
            delattr(ns, k)
    cfg = config_from_namespace(ns)
    for name, v in [("--preflight-prompts", extra["prompts"]), ("--preflight-samples", extra["n"]),
                    ("--preflight-max-new-tokens", extra["max_new"])]:
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    res = run_preflight(cfg, extra["prompts"], extra["max_new"], extra["n"], extra["random_adapter"],
                        extra["random_model"], extra["mean_abs"], extra["kl"])
    m = res.metrics
    print(f"preflight: mode={res.mode} precision={cfg.precision.quant_format} adapter={cfg.adapter.adapter}")
    print(f"  tokens={m.n_tokens} mean|dlogp|={m.mean_abs:.3g} max|dlogp|={m.max_abs:.3g} "
          f"frac_diff={m.frac_diff:.3f} KL_k1={m.kl_k1:.3g} KL_k3={m.kl_k3:.3g}")
    print(("  OK: " if res.ok else "  FAIL: ") + res.reason)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
