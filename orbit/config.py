"""Typed run configuration: one dataclass per argument group, and the argparse built from them.

The dataclasses are the single source of truth. Each field's `metadata` carries its help text
(and choices), `build_parser()` turns every field into a `--flag-name` inside an argument group
named after its dataclass, and `parse_args()` turns the namespace back into a `TrainConfig`.
A resolved config is written as JSON into the run directory and `TrainConfig.load()` reads it
back, so a run can be reproduced or resumed from what it actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRECISION_FORMATS = ("auto", "bf16", "int4", "int8", "fp8", "fp8-w8a8", "nvfp4", "mxfp4")
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "gspo", "rloo", "reinforce_plus_plus")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def arg(default: Any, help: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field whose metadata becomes an argparse option."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ClusterConfig:
    """Where the workers run."""

    ray_address: str = arg("", "Ray cluster address; empty starts a local Ray instance")
    device: str = arg("auto", "device for the workers; auto = cuda when available", ("auto", "cpu", "cuda"))
    num_workers: int = arg(0, "data-parallel workers; 0 = one per GPU, or 1 on CPU")
    trainer_backend: str = arg("torch", "training backend; megatron is not built yet", ("torch", "megatron"))
    use_ray: bool = arg(True, "run workers as Ray actors; --no-use-ray runs one in-process worker")
    cpu_threads: int = arg(0, "torch threads per CPU worker; 0 = its share of the cores minus one")


@dataclass
class CheckpointConfig:
    """What model to load and where checkpoints come from (named to avoid models.ModelConfig)."""

    hf_checkpoint: str = arg("", "HF model dir (safetensors) or a .gguf file; empty = embedded SmolLM2-135M Q4_1")
    megatron_load: str = arg("", "megatron-core checkpoint dir (megatron backend; not built yet)")
    resume: bool = arg(True, "resume from the latest checkpoint in --save when one exists")
    save_interval: int = arg(0, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = arg(2, "how many step checkpoints to keep in --save")


@dataclass
class PrecisionConfig:
    """Precision the frozen base is kept in."""

    quant_format: str = arg("auto", "base weight format; auto keeps the checkpoint's own", PRECISION_FORMATS)
    quant_group_size: int = arg(128, "group size along the input dim for int4/int8")
    precision_mode: str = arg("fast", "fast kernels, or batch-invariant exact kernels", ("fast", "exact"))
    compute_dtype: str = arg("auto", "activation dtype; auto = bf16 on GPU and on a CPU with native bf16 (AVX-512 BF16 / AMX), else float32", ("auto", "bf16", "float32"))
    fused_moe: bool = arg(True, "run quantized MoE experts through the grouped Triton kernel on "
                          "CUDA (--no-fused-moe: the per-expert loop, the reference)")
    qmm_routes: str = arg("", "route table from `python -m orbit tune-qmm` (which quantized-matmul "
                          "kernel and tile each shape runs on this GPU, fast mode); empty: the "
                          "table shipped for the device, if any, else the built-in rules")


@dataclass
class AdapterArgs:
    """The trainable BF16 adapter."""

    adapter: str = arg("lora", "adapter type", ("lora", "oft"))
    lora_rank: int = arg(16, "LoRA rank r")
    lora_alpha: float = arg(32.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = arg(0.0, "dropout on the LoRA input")
    use_rslora: bool = arg(False, "rank-stabilized LoRA scaling alpha / sqrt(r)")
    oft_block_size: int = arg(32, "OFT block size (rotation acts on blocks of this many input dims)")
    adapter_dtype: str = arg("bf16", "adapter weight dtype (float32 master copies are kept either way)",
                             ("bf16", "float32"))
    target_modules: list = arg(list(DEFAULT_TARGETS), "comma-separated linear names to wrap")  # noqa: RUF009


@dataclass
class RolloutConfig:
    """Sampling of responses."""

    rollout_backend: str = arg("native", "rollout engine (sglang: LoRA only, external)", ("native", "sglang"))
    rollout_temperature: float = arg(1.0, "sampling temperature")
    rollout_top_p: float = arg(1.0, "nucleus sampling top-p")
    rollout_max_response_len: int = arg(512, "max new tokens per response")
    n_samples_per_prompt: int = arg(8, "responses per prompt (the GRPO group size)")
    rollout_batch_size: int = arg(32, "prompts per RL step (over all workers)")
    max_num_seqs: int = arg(256, "max sequences decoded at once by one engine")
    max_prompt_len: int = arg(1024, "longest prompt in tokens (sizes the KV cache with the response length)")
    kv_cache_fraction: float = arg(0.4, "fraction of free GPU memory for the KV cache (GPU only)")
    rollout_attn_backend: str = arg(
        "sdpa", "engine attention for prefill/decode: sdpa; varlen or triton (CUDA, read the KV "
        "cache in place); auto = varlen where native, else triton on CUDA, else sdpa",
        ("sdpa", "varlen", "triton", "auto"))
    rollout_overlap: bool = arg(True, "on CUDA, launch each decode step from the previous step's "
                                "sampled tokens before the host reads them (exact mode: the same "
                                "bits; --no-rollout-overlap: one synchronous step at a time)")
    rollout_pdl: bool = arg(True, "on sm_90+ GPUs, launch the decode step's Triton kernels with "
                            "programmatic dependent launch (scheduling only: the same bits; "
                            "--no-rollout-pdl: plain launches)")
    rollout_fuse_lora: bool = arg(True, "on CUDA outside exact mode, run each decode step's LoRA "
                                  "adapters as one shrink and one expand-add launch per q/k/v, o, "
                                  "gate/up and down group (--no-rollout-fuse-lora: the plain "
                                  "four launches per adapted linear)")
    num_rollout: int = arg(0, "RL steps to run; 0 = derived from --num-epoch")


@dataclass
class DataConfig:
    """Prompts, labels and rewards."""

    prompt_data: str = arg("", "train JSONL")
    eval_prompt_data: str = arg("", "test JSONL (empty = no eval)")
    input_key: str = arg("prompt", "JSONL key holding the prompt")
    label_key: str = arg("label", "JSONL key holding the reference answer")
    apply_chat_template: bool = arg(True, "wrap prompts with the tokenizer's chat template")
    train_rows: int = arg(0, "use only the first N train rows (0 = all)")
    num_epoch: int = arg(1, "passes over the train rows")
    rollout_shuffle: bool = arg(True, "shuffle prompts each epoch")
    reward: str = arg("arithmetic", "comma-separated reward terms name[=weight]: arithmetic, math, "
                      "countdown, format, or module:function (e.g. math,format=0.1)")
    seed: int = arg(1234, "seed for data order, sampling and adapter init")


@dataclass
class AlgoConfig:
    """Advantages and the policy loss."""

    advantage_estimator: str = arg("grpo", "group advantage estimator", ADVANTAGE_ESTIMATORS)
    eps_clip: float = arg(0.2, "PPO clip range (low side)")
    eps_clip_high: float = arg(0.28, "PPO clip range, high side (clip-higher)")
    eps_clip_c: float = arg(0.0, "dual-clip constant c (> 1 enables dual clip; 0 = off)")
    kl_coef: float = arg(0.0, "KL penalty to the base (adapter off); 0 skips the ref forward")
    kl_estimator: str = arg("low_var_kl", "KL estimator", KL_ESTIMATORS)
    entropy_coef: float = arg(0.0, "entropy bonus coefficient")
    use_tis: bool = arg(False, "truncated importance sampling on the rollout/train log-prob ratio")
    tis_clip: float = arg(2.0, "TIS ratio upper bound")
    skip_zero_advantage: bool = arg(
        True, "train only on samples with a non-zero advantage when that is exact (no KL or "
        "entropy term): the others add exactly zero gradient")


@dataclass
class OptimConfig:
    """AdamW over the adapter parameters only."""

    lr: float = arg(1e-5, "peak learning rate")
    lr_warmup_steps: int = arg(0, "linear warmup optimizer steps")
    lr_decay_style: str = arg("constant", "after warmup", ("constant", "cosine", "linear"))
    min_lr: float = arg(0.0, "final LR for cosine/linear decay")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.98, "AdamW beta2")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    clip_grad: float = arg(1.0, "max global grad norm (0 = off)")
    max_tokens_per_micro_batch: int = arg(8192, "token budget of one packed micro-batch per worker")
    global_batch_size: int = arg(0, "samples per optimizer step; 0 = the whole rollout batch")


@dataclass
class EvalConfig:
    """pass@k evaluation on the test JSONL."""

    disable_eval: bool = arg(False, "skip evaluation")
    eval_interval: int = arg(10, "evaluate every N steps (and before the first and after the last)")
    n_samples_per_eval_prompt: int = arg(4, "k of pass@k")
    eval_max_response_len: int = arg(0, "max new tokens at eval (0 = rollout's)")
    eval_temperature: float = arg(0.6, "eval sampling temperature")
    eval_top_p: float = arg(1.0, "eval nucleus top-p")
    eval_rows: int = arg(0, "use only the first N test rows (0 = all)")


@dataclass
class LoggingConfig:
    """Run directory, metrics sinks and W&B."""

    save: str = arg("runs/orbit", "run directory: config.json, metrics.jsonl, checkpoints, plots")
    use_wandb: str = arg("auto", "W&B: auto = on when $HOME/.wandb_key exists", ("auto", "0", "1"))
    wandb_project: str = arg("orbit", "W&B project")
    wandb_mode: str = arg("offline", "W&B mode", ("offline", "online"))
    run_name: str = arg("", "run name (default: the run directory's name)")
    plot: bool = arg(True, "write reward/eval curves as PNG at the end")


GROUPS: dict[str, type] = {
    "cluster": ClusterConfig,
    "ckpt": CheckpointConfig,
    "precision": PrecisionConfig,
    "adapter": AdapterArgs,
    "rollout": RolloutConfig,
    "data": DataConfig,
    "algo": AlgoConfig,
    "optim": OptimConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
}


@dataclass
class TrainConfig:
    """Everything one training run needs, one sub-config per argument group."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    adapter: AdapterArgs = field(default_factory=AdapterArgs)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived quantities -------------------------------------------------------------
    def samples_per_step(self) -> int:
        return self.rollout.rollout_batch_size * self.rollout.n_samples_per_prompt

    def global_batch(self) -> int:
        return self.optim.global_batch_size or self.samples_per_step()

    def num_steps(self, num_train_rows: int) -> int:
        """RL steps: --num-rollout when set, capped by what --num-epoch passes over the rows give."""
        per_epoch = math.ceil(num_train_rows / self.rollout.rollout_batch_size)
        by_epochs = per_epoch * self.data.num_epoch
        return min(self.rollout.num_rollout, by_epochs) if self.rollout.num_rollout else by_epochs

    def validate(self) -> None:
        """ValueError naming the flag for settings that cannot work together."""
        r, o = self.rollout, self.optim
        for name, v in [("--rollout-batch-size", r.rollout_batch_size),
                        ("--n-samples-per-prompt", r.n_samples_per_prompt),
                        ("--rollout-max-response-len", r.rollout_max_response_len),
                        ("--max-tokens-per-micro-batch", o.max_tokens_per_micro_batch)]:
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.samples_per_step() % self.global_batch():
            raise ValueError(
                f"--global-batch-size {self.global_batch()} must divide rollout_batch_size * "
                f"n_samples_per_prompt = {self.samples_per_step()}"
            )
        if self.global_batch() % r.n_samples_per_prompt and self.global_batch() < self.samples_per_step():
            raise ValueError(
                f"--global-batch-size {self.global_batch()} must hold whole groups of "
                f"--n-samples-per-prompt {r.n_samples_per_prompt}"
            )
        if self.cluster.trainer_backend == "megatron" or self.ckpt.megatron_load:
            raise ValueError("the megatron trainer backend is not built yet; use --trainer-backend torch")
        if r.rollout_backend == "sglang" and self.adapter.adapter != "lora":
            raise ValueError("--rollout-backend sglang serves LoRA adapters only; use --adapter lora")
        if self.algo.eps_clip_c and self.algo.eps_clip_c <= 1.0:
            raise ValueError(f"--eps-clip-c must be > 1 to enable dual clip, got {self.algo.eps_clip_c}")
        if not self.data.prompt_data:
            raise ValueError("--prompt-data (train JSONL) is required")
        if self.precision.qmm_routes:  # a bad table fails here, before any worker starts
            from orbit.kernels.qmm_routes import load_routes

            try:
                load_routes(self.precision.qmm_routes)
            except ValueError as e:
                raise ValueError(f"--qmm-routes: {e}") from None

    # ---- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, dict[str, Any]]) -> TrainConfig:
        unknown = set(d) - set(GROUPS)
        if unknown:
            raise ValueError(f"config has unknown groups {sorted(unknown)}")
        parts = {}
        for name, group_cls in GROUPS.items():
            values = d.get(name, {})
            known = {f.name for f in dataclasses.fields(group_cls)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"config group {name!r} has unknown fields {sorted(bad)}")
            parts[name] = group_cls(**values)
        return cls(**parts)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- argparse ---------------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str = "python -m orbit.train") -> argparse.ArgumentParser:
    """An ArgumentParser with one group per config dataclass and one flag per field."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="RL post-training (GRPO family): frozen low-precision base + trainable BF16 adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    seen: set[str] = set()
    for group_name, group_cls in GROUPS.items():
        doc = (group_cls.__doc__ or "").strip().splitlines()[0]
        group = parser.add_argument_group(f"{group_name} ({group_cls.__name__})", doc)
        hints = typing.get_type_hints(group_cls)
        for f in dataclasses.fields(group_cls):
            assert f.name not in seen, f"flag --{f.name} defined twice"
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw: dict[str, Any] = {"dest": f"{group_name}.{f.name}", "default": default,
                                  "help": f.metadata.get("help", "")}
            typ = hints[f.name]
            if typ is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typ is list:
                kw["type"] = _split_list
                kw["metavar"] = "A,B,..."
            else:
                kw["type"] = typ
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
                else:
                    kw["metavar"] = typ.__name__.upper()
            group.add_argument(_flag(f.name), **kw)
    return parser


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    for dest, value in vars(ns).items():
        group, _, name = dest.partition(".")
        grouped[group][name] = list(value) if isinstance(value, (list, tuple)) else value
    return TrainConfig.from_dict(grouped)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse a command line into a TrainConfig (not validated: call .validate())."""
    return config_from_namespace(build_parser().parse_args(argv))


def to_argv(cfg: TrainConfig) -> list[str]:
    """The command line that parses back into `cfg` (used to launch identical workers)."""
    out: list[str] = []
    for group_name, group_cls in GROUPS.items():
        sub = getattr(cfg, group_name)
        for f in dataclasses.fields(group_cls):
            v = getattr(sub, f.name)
            if isinstance(v, bool):
                out.append(_flag(f.name) if v else "--no-" + f.name.replace("_", "-"))
            elif isinstance(v, list):
                out += [_flag(f.name), ",".join(v)]
            else:
                out += [_flag(f.name), str(v)]
    return out
