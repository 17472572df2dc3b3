"""LoRA around any frozen base linear: y = base(x) + scale * B(A(dropout(x))).

The base is whatever computes the frozen projection (`nn.Linear`, `QuantLinear`); it is kept
as the `base` attribute and never modified, so the low-precision base path is the same with
the adapter on or off. Tensor names and layouts follow PEFT (`lora_A` [r, in], `lora_B`
[out, r]) so export is a rename, and the init matches PEFT's (A kaiming-uniform, B = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from orbit.adapters.slots import SlottedAdapter


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a base linear, with a clear error for anything else."""
    try:
        return int(base.in_features), int(base.out_features)
    except AttributeError as e:
        raise ValueError(
            f"adapter base must be a linear with in_features/out_features, got {type(base).__name__}"
        ) from e


def base_weight(base: nn.Module) -> Tensor:
    """The base weight [out, in] as a float32 tensor (dequantized for QuantLinear)."""
    if hasattr(base, "dequantize"):
        return base.dequantize().to(torch.float32)
    if isinstance(getattr(base, "weight", None), Tensor):
        return base.weight.detach().to(torch.float32)
    raise ValueError(f"cannot read the weight of base module {type(base).__name__}")


class LoRALinear(SlottedAdapter):
    """Low-rank update on a frozen linear; `active_slot=None` returns exactly `base(x)`."""

    slot_names = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        in_f, out_f = base_features(base)
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_device(base) if device is None else torch.device(device)
        a = torch.empty(r, in_f, dtype=torch.float32, device=device)
        # PEFT's default init: A like nn.Linear (kaiming-uniform, a=sqrt(5)), B zero -> delta 0.
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(out_f, r, dtype=torch.float32, device=device)
        self._init_slots({"lora_A": a.to(dtype), "lora_B": b.to(dtype)})
        # The engine's decode group (orbit/adapters/lora_decode.py), or None: plain forward.
        self.decode_group = None

    def swiglu_with(self, up: nn.Module, x: Tensor) -> Tensor | None:
        """silu(self(x)) * up(x) from one launch where possible (orbit.models.transformer's
        MLP asks the gate layer): the decode group's, with the adapters' deltas inside, or the
        base layers' own with no adapter active; else None."""
        if self.active_slot is None:  # the base alone (no dropout applies either)
            base_fn = getattr(self.base, "swiglu_with", None)
            up_base = getattr(up, "base", None)
            if base_fn is None or up_base is None or getattr(up, "active_slot", 0) is not None:
                return None
            return base_fn(up_base, x)
        if self.decode_group is None:
            return None
        return self.decode_group.swiglu_output(self, up, x)

    def mlp_chain_with(self, up: nn.Module, down: nn.Module, x: Tensor) -> Tensor | None:
        """down(silu(self(x)) * up(x)) from one persistent launch (orbit/kernels/gemv_chain.py):
        the base layers' (QuantLinear.mlp_chain_with) where no adapter of gate, up or down is
        active; with adapters active, where `gemv_chain.CHAIN_LORA` allows it, the decode
        groups' epilogues inside the launch (LoRADecodeGroup.chain_plan); else None."""
        if all(getattr(m, "active_slot", None) is None for m in (self, up, down)):
            bases = [getattr(m, "base", m) for m in (self, up, down)]
            fn = getattr(bases[0], "mlp_chain_with", None)
            return fn(bases[1], bases[2], x) if fn is not None else None
        from orbit.kernels import gemv_chain

        down_group = getattr(down, "decode_group", None)
        if not gemv_chain.CHAIN_LORA or self.decode_group is None or down_group is None:
            return None
        x2d = x.reshape(-1, self.in_features)
        hidden = torch.empty((x2d.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        plan = self.decode_group.chain_plan(self, up, x2d, down_group, hidden)
        if plan is None or not gemv_chain.mlp_chain_fits(x2d, plan[0], plan[1]):
            return None
        y = gemv_chain.mlp_chain(x2d, plan[0], plan[1], lora=(plan[2], plan[3]), hidden=hidden)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        if self.decode_group is not None:
            out = self.decode_group.output(self, x)
            if out is not None:
                return out
        y = self.base(x)
        if self.active_slot is None:
            return y
        a = self.slot_tensor(self.active_slot, "lora_A")  # [r, in]
        b = self.slot_tensor(self.active_slot, "lora_B")  # [out, r]
        h = self._lowrank_matmul(self.dropout(x).to(a.dtype), a)  # [..., r]
        return y + (self.scale * self._lowrank_matmul(h, b)).to(y.dtype)

    def _lowrank_matmul(self, x: Tensor, w: Tensor) -> Tensor:
        """x @ w^T for the two low-rank products; exact mode swaps in a batch-invariant one."""
        return x @ w.T

    def graph_key(self) -> tuple:
        """What a captured CUDA graph of this module depends on: only the active slot. Staging
        writes new values into the slot tensors in place and forward reads them inside the
        graph, so a push needs no re-capture (unlike OFT, whose rotation is built outside)."""
        return (self.active_slot,)

    def delta_weight(self, slot: int = 0) -> Tensor:
        """scale * B @ A in float32 [out, in]: what merging adds to the base weight."""
        a = self.slot_tensor(slot, "lora_A").detach().float()
        b = self.slot_tensor(slot, "lora_B").detach().float()
        return self.scale * (b @ a)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}, active_slot={self.active_slot}"


def base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters()) + list(base.buffers()):
        return t.device
    return torch.device("cpu")
