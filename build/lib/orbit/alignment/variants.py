"""Build the (precision, adapter, mode) variants that the alignment benchmark and the preflight
compare, from one base model.

A variant is Orbit's setup: one model whose base is frozen at `precision`, an adapter with
random nonzero weights in slot 0 (so the adapter path is really exercised), optionally switched
to exact mode; the engine and the trainer share it. The *conventional* baseline is two models
with the same weights: a BF16 trainer and a quantized inference copy for the sampler, with the
adapter values copied from one to the other, as systems that quantize only for rollout do.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from orbit.adapters.inject import AdapterConfig, AdapterSet, inject_adapters
from orbit.alignment.exact import convert_exact
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.quant.convert import convert_linears
from orbit.quant.linear import QuantLinear

PRECISIONS = ("bf16", "int4", "fp8", "fp8-w8a8", "nvfp4", "mxfp4")
ADAPTERS = ("none", "lora", "oft")
MODES = ("fast", "exact")


class W8A8Linear(QuantLinear):
    """QuantLinear (fp8 weight) that also quantizes activations to fp8 (W8A8) through
    `dispatch.qmm(..., act_quant="fp8")`. QuantLinear has no switch for this yet; the class
    swap adds no state (see orbit.alignment.exact for the pattern)."""

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        from orbit.kernels import dispatch

        return dispatch.qmm(x2d, self.quantized_weight(), exact=self.exact, act_quant="fp8")


def random_model(config: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                 seed: int = 0) -> CausalLM:
    """A CausalLM with random weights scaled so activations keep unit RMS through the layers
    and the logits have a spread like a trained model's (std ~ 4), not a flat distribution."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(config)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.normal_(0.0, 1.0 / math.sqrt(mod.in_features))
                if mod.bias is not None:
                    mod.bias.normal_(0.0, 0.02)
        # logits = norm(h) @ W_head^T with unit-RMS rows: std 4 / sqrt(D) gives logit std ~4
        head_std = 4.0 / math.sqrt(config.hidden_size)
        if config.tie_word_embeddings:
            model.model.embed_tokens.weight.normal_(0.0, head_std)  # also the head
        else:
            model.model.embed_tokens.weight.normal_(0.0, 1.0)
            model.lm_head.weight.normal_(0.0, head_std)
    model.to(dtype)
    model.model.rotary_emb.reset(device)  # cos/sin tables stay float32
    model.requires_grad_(False)
    return model.eval()


def quantize_base(model: nn.Module, precision: str, group_size: int | None = None) -> int:
    """Quantize the attention/MLP linears in place; returns how many. bf16 leaves them alone.
    `group_size` applies to int4 (default 128)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return 0
    fmt = "fp8" if precision == "fp8-w8a8" else precision
    n = convert_linears(model, fmt, group_size=group_size if fmt == "int4" else None)
    if precision == "fp8-w8a8":
        for m in model.modules():
            if type(m) is QuantLinear and m.weight_format == "fp8":
                m.__class__ = W8A8Linear
    return n


def add_adapter(model: nn.Module, adapter: str, seed: int = 0, r: int = 16,
                oft_block_size: int = 32) -> AdapterSet | None:
    """Inject LoRA/OFT on every attention/MLP projection with random *nonzero* slot-0 weights
    (PEFT's init makes the delta zero, which would hide the adapter path), active slot 0."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
    if adapter == "none":
        return None
    aset = inject_adapters(model, AdapterConfig(kind=adapter, r=r, alpha=2.0 * r, block_size=oft_block_size))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in aset.named_trainable_parameters():
            # LoRA B ~ 0.02 gives a delta of a few percent of the base output; OFT's skew
            # entries ~ 0.02 rotate each block by a small, nonzero angle.
            v = torch.randn(p.shape, generator=g) * (0.02 if not name.endswith("lora_A") else 1.0 / math.sqrt(p.shape[1]))
            p.copy_(v.to(p.dtype))
    aset.set_active(0)
    return aset


def build_variant(base: nn.Module, precision: str, adapter: str, mode: str,
                  seed: int = 0, group_size: int | None = None) -> tuple[nn.Module, AdapterSet | None]:
    """Orbit's setup from a float base model (deep-copied, `base` is untouched)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = copy.deepcopy(base)
    quantize_base(model, precision, group_size)
    aset = add_adapter(model, adapter, seed)
    if mode == "exact":
        convert_exact(model)
    return model, aset


def build_conventional(base: nn.Module, precision: str, adapter: str, seed: int = 0,
                       group_size: int | None = None) -> tuple[nn.Module, nn.Module, list[Any]]:
    """(BF16 trainer model, quantized rollout copy, adapter sets): same base weights, the same
    adapter values in both (copied, as a weight sync would). Fast mode only: the conventional
    setup has no batch-invariant kernels."""
    trainer, t_set = build_variant(base, "bf16", adapter, "fast", seed)
    rollout = copy.deepcopy(base)
    quantize_base(rollout, precision, group_size)
    r_set = add_adapter(rollout, adapter, seed)
    if t_set is not None and r_set is not None:
        with torch.no_grad():
            for (n1, p1), (n2, p2) in zip(t_set.named_trainable_parameters(), r_set.named_trainable_parameters()):
                assert n1 == n2, (n1, n2)
                p2.copy_(p1)
    return trainer, rollout, [s for s in (t_set, r_set) if s is not None]
