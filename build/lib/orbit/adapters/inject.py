"""The adapter converter: wrap a model's target linears with LoRA/OFT and own their buffers.

`inject_adapters(model, cfg)` swaps each matching `nn.Linear` / `QuantLinear` for a wrapper
that keeps it as `.base` (so `model.layers.0.self_attn.q_proj.base` is the frozen linear and
the model's own paths stay HF-like), binds all adapter tensors into one flat buffer per slot,
and returns the `AdapterSet` the trainer and engine drive: train slot 0, serve slot 1,
`None` = adapter off (reference log-probs without a reference model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from orbit.adapters.lora import LoRALinear
from orbit.adapters.oft import OFTLinear, build_step_rotations
from orbit.adapters.slots import FlatSlots, SlottedAdapter
from orbit.quant.convert import name_matches
from orbit.quant.linear import QuantLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterConfig:
    """What to inject. OFT uses `block_size` if > 0, else `r` as the number of blocks.
    `targets`: module-path patterns (see `matches`); MoE expert linears are targets like any
    other linear when they are `nn.Linear`/`QuantLinear` modules (e.g. "*.experts.*")."""

    kind: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    block_size: int = 32
    num_terms: int = 5
    cayley_neumann: bool = True
    block_share: bool = False
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    dtype: torch.dtype = torch.bfloat16
    freeze_base: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "oft"):
            raise ValueError(f"AdapterConfig.kind must be 'lora' or 'oft', got {self.kind!r}")
        if self.kind == "lora" and self.r <= 0:
            raise ValueError(f"AdapterConfig.r must be positive for LoRA, got {self.r}")
        if self.kind == "oft" and self.block_size <= 0 and self.r <= 0:
            raise ValueError("AdapterConfig for OFT needs block_size > 0 or r > 0")
        if not self.targets:
            raise ValueError("AdapterConfig.targets is empty")
        self.targets = tuple(self.targets)


def matches(path: str, pattern: str) -> bool:
    """The quantization converter's rule, so one target list means the same modules for both:
    `re:<regex>` fullmatches the path, a glob with * ? [ matches the path, a plain name matches
    the path or its dotted suffix (PEFT's list rule)."""
    return name_matches(path, pattern)


def is_base_linear(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, QuantLinear))


def _wrap(base: nn.Module, cfg: AdapterConfig) -> SlottedAdapter:
    if cfg.kind == "lora":
        return LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype=cfg.dtype)
    use_block = cfg.block_size > 0
    return OFTLinear(
        base,
        block_size=cfg.block_size if use_block else 0,
        r=0 if use_block else cfg.r,
        use_cayley_neumann=cfg.cayley_neumann,
        num_terms=cfg.num_terms,
        block_share=cfg.block_share,
        dtype=cfg.dtype,
    )


class AdapterSet:
    """The injected adapter modules (by model path, without `.base`) and their flat slots."""

    def __init__(self, model: nn.Module, cfg: AdapterConfig, modules: dict[str, SlottedAdapter]):
        self.model = model
        self.cfg = cfg
        self.modules = modules
        self.slots = FlatSlots(modules, cfg.dtype)
        self.slots.set_active(0)
        self._active: int | None = 0
        self._oft = [m for m in modules.values() if isinstance(m, OFTLinear)]
        # Batched R build at the start of each training forward of the whole model.
        self.batched_rotations = bool(self._oft)
        self._hook = model.register_forward_pre_hook(self._before_forward) if self._oft else None

    def _before_forward(self, module: nn.Module, args: tuple) -> None:
        if self.batched_rotations and self._active == 0 and torch.is_grad_enabled():
            build_step_rotations(self._oft)

    # ---- training ---------------------------------------------------------------------
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for path, mod in self.modules.items():
            for name in mod.slot_names:
                yield f"{path}.{name}", getattr(mod, name)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Slot-0 parameters (views into `flat(0)`): what the optimizer gets."""
        return [p for _, p in self.named_trainable_parameters()]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def flat(self, slot: int) -> Tensor:
        return self.slots.flat(slot)

    # ---- slots ------------------------------------------------------------------------
    def stage(self, src: int = 0, dst: int = 1, wait: bool = True) -> None:
        """Copy slot `src` into `dst` (one device copy; side stream on CUDA)."""
        self.slots.stage(src, dst, wait)

    def set_active(self, slot: int | None) -> None:
        self.slots.set_active(slot)
        self._active = slot

    @property
    def active_slot(self) -> int | None:
        return self._active

    @contextlib.contextmanager
    def use_slot(self, slot: int | None) -> Iterator[None]:
        prev = self._active
        self.set_active(slot)
        try:
            yield
        finally:
            self.set_active(prev)

    def adapter_disabled(self) -> contextlib.AbstractContextManager[None]:
        """`with aset.adapter_disabled(): ...` runs the exact base model."""
        return self.use_slot(None)

    # ---- PEFT files -------------------------------------------------------------------
    def state_dict_peft(self, slot: int = 0) -> dict[str, Tensor]:
        from orbit.adapters.peft_io import state_dict_peft

        return state_dict_peft(self, slot)

    def save_peft(self, path: str | Path, base_model_name_or_path: str = "", slot: int = 0) -> None:
        from orbit.adapters.peft_io import save_peft

        save_peft(self, path, base_model_name_or_path, slot)

    def load_peft(self, path: str | Path, slot: int = 0) -> None:
        from orbit.adapters.peft_io import load_peft

        load_peft(self, path, slot)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> AdapterSet:
    """Wrap every base linear whose path matches `cfg.targets`; returns the owning set.

    Call it after the model is on its final device and dtype: moving the model afterwards
    breaks the flat-buffer views (detected by `AdapterSet.stage`).
    """
    if cfg.freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    found = [
        (path, mod)
        for path, mod in model.named_modules()
        if is_base_linear(mod)
        and any(matches(path, t) for t in cfg.targets)
        and not isinstance(_parent(model, path), SlottedAdapter)
    ]
    if not found:
        raise ValueError(f"adapter targets {list(cfg.targets)} matched no nn.Linear/QuantLinear")
    modules: dict[str, SlottedAdapter] = {}
    for path, mod in found:
        wrapper = _wrap(mod, cfg)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapper)
        modules[path] = wrapper
    return AdapterSet(model, cfg, modules)


def _parent(model: nn.Module, path: str) -> nn.Module | None:
    parent_path, _, _ = path.rpartition(".")
    return model.get_submodule(parent_path) if parent_path else None
