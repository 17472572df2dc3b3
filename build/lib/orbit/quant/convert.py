"""Swap a model's `nn.Linear`s for `QuantLinear`s: quantization as a module swap.

Model code never branches on precision; it builds plain `nn.Linear`s and this converter
replaces the targeted ones after the weights are loaded (the torchtitan / gpt-fast pattern).
Embeddings and the LM head stay in high precision unless named explicitly.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from orbit.quant.linear import QuantLinear

# Attention, MLP and expert linears of Llama / Qwen3 / Qwen3-MoE (HF and Orbit names; the
# fused qkv_proj / gate_up_proj are Orbit's packed projections).
DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "*.experts.*",
)


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """ValueError naming a target pattern that cannot be what the caller meant: a `re:` pattern
    that does not compile, or a pattern of its own (not one of DEFAULT_TARGETS, which name
    every architecture's linears) that matches no module, or only modules that are not
    linears (`embed_tokens`). A typo would otherwise leave those layers in BF16 silently."""
    for p in targets:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"target pattern {p!r} is not a valid regular expression: "
                                 f"{e}") from None
    names = [(n, m) for n, m in model.named_modules() if n]
    for p in targets:
        if p in DEFAULT_TARGETS:
            continue
        hits = [(n, m) for n, m in names if name_matches(n, p)]
        if not hits:
            some = ", ".join(n for n, m in names if isinstance(m, (nn.Linear, QuantLinear)))
            raise ValueError(f"target pattern {p!r} matches no module of the model (its linears "
                             f"are named like: {some[:160]}...)")
        if not any(isinstance(m, (nn.Linear, QuantLinear)) for _, m in hits):
            n, m = hits[0]
            raise ValueError(f"target pattern {p!r} matches only modules that are not linears "
                             f"({n!r} is a {type(m).__name__}); only nn.Linear is quantized")


def name_matches(name: str, pattern: str) -> bool:
    """`re:<regex>` (re.fullmatch), a glob with * ? [ (fnmatch on the full name), or a plain
    module name that matches the last components (`q_proj` matches
    `model.layers.0.self_attn.q_proj`)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def replace_linear(parent: nn.Module, name: str, qlinear: nn.Module) -> None:
    """Put `qlinear` in place of the child `name` of `parent` (works for ModuleList indices)."""
    if name not in parent._modules:
        raise ValueError(f"{type(parent).__name__} has no child module {name!r}")
    setattr(parent, name, qlinear)


def convert_linears(
    model: nn.Module,
    fmt: str,
    targets: Sequence[str] = DEFAULT_TARGETS,
    group_size: int | None = None,
    symmetric: bool = True,
    cache_dequantized: bool | None = None,
) -> int:
    """Quantize every `nn.Linear` whose qualified name matches a pattern in `targets` to `fmt`,
    in place; returns how many were converted. A matching linear the format cannot hold
    (e.g. in_features not divisible by the group) raises ValueError naming it."""
    if isinstance(targets, str):
        raise TypeError("targets must be a sequence of patterns, not a single string")
    check_targets(model, targets)
    chosen = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and any(name_matches(name, p) for p in targets)
    ]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            qlinear = QuantLinear.from_linear(
                linear,
                fmt,
                group_size=group_size,
                symmetric=symmetric,
                cache_dequantized=cache_dequantized,
            )
        except ValueError as e:
            raise ValueError(f"cannot convert linear {name!r} to {fmt}: {e}") from e
        replace_linear(parent, child, qlinear)
    return len(chosen)
