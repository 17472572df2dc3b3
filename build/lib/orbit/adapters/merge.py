"""Fold a trained adapter into a BF16 copy of its base weight, for export to tools that know
nothing about adapters (a plain HF checkpoint, an inference server without LoRA/OFT support).

The live model is never modified: Orbit always runs base + adapter unmerged, so the frozen
(possibly quantized) base stays the one the sampler and trainer share. Quantized bases are
dequantized with the reference dequantization first.
  LoRA: W' = W + scale * B @ A
  OFT:  y = base(x @ R) = x @ (W @ R^T)^T, so W' = W @ R^T   (R the [in, in] block diagonal)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from orbit.adapters.lora import LoRALinear, base_weight
from orbit.adapters.oft import OFTLinear
from orbit.adapters.slots import SlottedAdapter

if TYPE_CHECKING:
    from orbit.adapters.inject import AdapterSet


def merged_weight(
    module: SlottedAdapter, slot: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """The merged [out, in] weight of one adapter module, computed in float32, cast to `dtype`."""
    if not isinstance(module, (LoRALinear, OFTLinear)):
        raise ValueError(f"cannot merge adapter module of type {type(module).__name__}")
    w = base_weight(module.base)  # [out, in] float32
    if isinstance(module, LoRALinear):
        merged = w + module.delta_weight(slot).to(w.device)
    else:
        merged = w @ module.block_diag(slot).to(w.device).T
    return merged.to(dtype)


def merged_state_dict(
    aset: AdapterSet, slot: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Tensor]:
    """`<module path>.weight` (and `.bias` where the base has one) for every adapted linear,
    with HF-style paths, ready to overlay on the base checkpoint."""
    out: dict[str, Tensor] = {}
    for path, mod in aset.modules.items():
        out[f"{path}.weight"] = merged_weight(mod, slot, dtype)
        bias = getattr(mod.base, "bias", None)
        if isinstance(bias, Tensor):
            out[f"{path}.bias"] = bias.detach().to(dtype).clone()
    return out
