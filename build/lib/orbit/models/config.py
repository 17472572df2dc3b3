"""Model hyper-parameters read from a HF `config.json` (or GGUF metadata), validated once.

Orbit's model code reads only `ModelConfig`, never a transformers config object, so the model
can be built without transformers and from GGUF files. Every field that changes the math is
checked here: an architecture or value Orbit does not implement raises `ValueError` naming it
instead of silently computing something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    """Decoder-only transformer shape. `arch` is one of `ARCHITECTURES`."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Normalised rope scaling: {"rope_type": ..., "factor": ..., ...}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # MoE (Qwen3-MoE); num_experts == 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.arch!r}; Orbit implements {ARCHITECTURES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        rtype = (self.rope_scaling or {}).get("rope_type", "default")
        if rtype not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling rope_type {rtype!r}; Orbit implements {ROPE_TYPES} "
                "('dynamic' NTK depends on the live sequence length, which a position-indexed "
                "cos/sin cache cannot express)"
            )
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}"
            )
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")

    def is_moe_layer(self, i: int) -> bool:
        """Same rule as transformers' Qwen3MoeDecoderLayer."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a HF `config.json` (transformers 4.x or 5.x field names)."""
        archs = d.get("architectures") or []
        if len(archs) != 1:
            raise ValueError(f"config.json 'architectures' must name exactly one class, got {archs!r}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; Orbit implements {ARCHITECTURES}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; Orbit implements SwiGLU with 'silu'")
        if d.get("pretraining_tp", 1) != 1:
            raise ValueError(f"unsupported pretraining_tp={d['pretraining_tp']} (must be 1)")
        if d.get("use_sliding_window"):
            raise ValueError("unsupported use_sliding_window=true (Orbit attends to the full context)")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor={d['partial_rotary_factor']}")
        theta, scaling = _rope_from_hf(d)
        heads = d["num_attention_heads"]
        moe = arch == "Qwen3MoeForCausalLM"
        n_exp = (d.get("num_experts") or d.get("num_local_experts") or 0) if moe else 0
        if moe and not n_exp:
            raise ValueError("Qwen3MoeForCausalLM config has no 'num_experts'")
        return cls(
            arch=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 0),
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            num_experts=n_exp,
            num_experts_per_tok=d.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=d.get("moe_intermediate_size", 0) if moe else 0,
            norm_topk_prob=bool(d.get("norm_topk_prob", False)) if moe else False,
            decoder_sparse_step=d.get("decoder_sparse_step", 1) if moe else 1,
            mlp_only_layers=list(d.get("mlp_only_layers") or []) if moe else [],
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ModelConfig:
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ValueError(f"{p} does not exist: not a HF model directory")
        return cls.from_hf_dict(json.loads(p.read_text()))


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised scaling or None) from 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and not isinstance(next(iter(params.values())), dict):
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    elif params:
        raise ValueError("unsupported per-layer-type rope_parameters in config.json")
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:  # 4.x legacy key
        scaling["rope_type"] = scaling.pop("type")
    rtype = scaling.get("rope_type", "default")
    if rtype not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling rope_type {rtype!r}; Orbit implements {ROPE_TYPES}")
    if rtype == "default":
        return theta, None
    if "factor" not in scaling and rtype != "yarn":
        raise ValueError(f"rope_scaling of type {rtype!r} needs a 'factor'")
    if rtype in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        if rtype == "llama3":
            raise ValueError("rope_scaling of type 'llama3' needs 'original_max_position_embeddings'")
        scaling["original_max_position_embeddings"] = d.get("max_position_embeddings", 4096)
    return theta, scaling
