"""Exact precision mode as a module swap: `convert_exact(model)` makes the trainer's packed
forward and the engine's prefill/decode compute bit-identical log-probs on GPU.

What differs between the two sides in fast mode, and what replaces it here:
- dense matmuls (base nn.Linear, lm_head, LoRA A/B): library GEMMs pick kernels by M ->
  `ExactLinear` / `ExactLoRALinear` call `orbit.kernels.matmul_exact` (one tile config for
  every M, no split-K);
- quantized bases: `ExactQuantLinear` routes them to `dispatch.qmm(..., exact=True)` on CUDA
  (and `QuantLinear.exact = True` for subclasses such as W8A8, which call dispatch themselves);
- RMSNorm: torch reductions split rows by batch shape -> `ExactRMSNorm` (one program per row);
- attention: SDPA (packed) vs. a masked batched read (decode) -> every `AttnBatch` passed to
  the model is viewed as an `ExactAttnBatch`, whose single Triton kernel walks keys in fixed
  64-position blocks from 0 upward in both cases (`orbit.kernels.attention_exact`).
OFT's CUDA rotation kernel already uses one tile config per block size (ExactOFTLinear only
changes the CPU path), RoPE/SiLU/residuals are elementwise, and the log-softmax is one row per
block: those need nothing. On CPU every Exact* op accumulates in float64 and rounds, which is
batch-invariant unless a float64 sum lands within ~1e-16 of a rounding boundary.

The swaps change classes in place (`module.__class__ = Exact*`): the Exact classes subclass the
originals and add no state, so parameters, buffers, tied weights, adapter slots and hooks stay
exactly where they were and `revert_exact` undoes everything. Call it last: after loading,
quantization (`convert_linears`) and adapter injection.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from orbit.adapters.lora import LoRALinear
from orbit.adapters.oft import OFTLinear
from orbit.kernels import dispatch
from orbit.kernels.attention_exact import attention_cached_exact, attention_packed_exact
from orbit.kernels.matmul_exact import exact_linear, matmul_exact_reference
from orbit.kernels.oft_rotate import oft_rotate
from orbit.kernels.rmsnorm_exact import RMSNormFunction
from orbit.models.attention import AttnBatch
from orbit.models.transformer import CausalLM, RMSNorm
from orbit.quant.linear import QuantLinear

_HOOK_ATTR = "_orbit_exact_hook"


class ExactLinear(nn.Linear):
    """nn.Linear whose forward is the batch-invariant matmul (same weight, same bias)."""

    def forward(self, x: Tensor) -> Tensor:
        return exact_linear(x, self.weight, self.bias)


class ExactLoRALinear(LoRALinear):
    """LoRALinear with both low-rank products through the batch-invariant matmul; the rest of
    the math (dropout, dtype casts, scale) is LoRALinear.forward itself."""

    def _lowrank_matmul(self, x: Tensor, w: Tensor) -> Tensor:
        return exact_linear(x, w)


class ExactQuantLinear(QuantLinear):
    """QuantLinear in exact mode. CUDA: `dispatch.qmm(..., exact=True)` (the batch-invariant
    fused kernels). CPU: QuantLinear's cached dense weight through the float64-accumulated
    reference, since a plain CPU matmul is not batch-invariant either."""

    def _matmul(self, x2d: Tensor) -> Tensor:
        if x2d.is_cuda:
            return dispatch.qmm(x2d, self.quantized_weight(), exact=True)
        return matmul_exact_reference(x2d, self._dense_weight(x2d.dtype, x2d.device))


class ExactOFTLinear(OFTLinear):
    """OFTLinear in exact mode. The CUDA rotation kernel already has one tile config per block
    size (batch-invariant); on CPU the block einsum is done in float64 and rounded."""

    def forward(self, x: Tensor) -> Tensor:
        if self.active_slot is None:
            return self.base(x)
        rot = self._cached_rotation(self.active_slot)  # [n or 1, b, b]
        if x.is_cuda:
            return self.base(oft_rotate(x, rot))
        n_rot, b, _ = rot.shape
        n = x.shape[-1] // b
        xb = x.double().reshape(*x.shape[:-1], n, b)  # [..., n, b]
        r64 = rot.to(x.dtype).double().expand(n, b, b) if n_rot == 1 else rot.to(x.dtype).double()
        xr = torch.einsum("...rk,rkc->...rc", xb, r64).reshape(x.shape).to(x.dtype)
        return self.base(xr)


class ExactRMSNorm(RMSNorm):
    """RMSNorm with a per-row (batch-invariant) reduction."""

    def forward(self, x: Tensor) -> Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


@dataclass
class ExactAttnBatch(AttnBatch):
    """An AttnBatch whose `attend` runs the one-order kernel for packed and cached batches.

    Built from the caller's AttnBatch by `as_exact` (same fields, same metadata dict), so the
    engine and the trainer keep constructing plain `AttnBatch.packed/cached`.
    """

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (after RoPE) -> [T, H, D]."""
        T = q.shape[0]
        if self.kind == "packed":
            return attention_packed_exact(q, k, v, self.cu_seqlens, self._max_new(T))
        cache = self.cache
        assert cache is not None and self.slots is not None and self.start_pos is not None
        if cache.dtype != q.dtype:
            # The packed path reads K/V in q.dtype; a cache in another dtype would round them.
            raise ValueError(f"exact mode needs the KV cache in the compute dtype {q.dtype}, "
                             f"got {cache.dtype}")
        kc, vc = self._write_kv(layer, k, v)  # same dtype: the write does not round
        return attention_cached_exact(q, kc, vc, self.cu_seqlens, self.slots, self.start_pos,
                                      self._max_new(T))


def as_exact(attn: AttnBatch) -> ExactAttnBatch:
    """View `attn` as an ExactAttnBatch (shares its tensors, cache and per-batch metadata)."""
    if isinstance(attn, ExactAttnBatch):
        return attn
    vals = {f.name: getattr(attn, f.name) for f in fields(attn)}
    return ExactAttnBatch(**vals)


def _exact_attn_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of CausalLM: swap the AttnBatch argument for its exact view."""
    if len(args) >= 3:
        args = (*args[:2], as_exact(args[2]), *args[3:])
    elif "attn" in kwargs:
        kwargs = {**kwargs, "attn": as_exact(kwargs["attn"])}
    else:
        raise ValueError("exact mode: CausalLM.forward called without an AttnBatch")
    return args, kwargs


_SWAPS: tuple[tuple[type, type], ...] = (
    (nn.Linear, ExactLinear),
    (LoRALinear, ExactLoRALinear),
    (RMSNorm, ExactRMSNorm),
    (QuantLinear, ExactQuantLinear),
    (OFTLinear, ExactOFTLinear),
)


def convert_exact(model: nn.Module) -> dict[str, int]:
    """Switch `model` (a CausalLM, after quantization and adapter injection) to exact mode, in
    place. Returns how many modules of each kind were converted. Idempotent."""
    if not isinstance(model, CausalLM):
        raise ValueError(f"convert_exact needs a CausalLM, got {type(model).__name__}")  # noqa: TRY004
    counts = {"linear": 0, "lora": 0, "oft": 0, "rmsnorm": 0, "quant": 0, "attention": 0}
    keys = {ExactLinear: "linear", ExactLoRALinear: "lora", ExactRMSNorm: "rmsnorm",
            ExactQuantLinear: "quant", ExactOFTLinear: "oft"}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.exact = True  # subclasses (W8A8) pass it to dispatch themselves
        for base, exact in _SWAPS:
            if type(mod) is base:  # exact type: leave unknown subclasses alone
                mod.__class__ = exact
            if type(mod) is exact:
                counts[keys[exact]] += 1
                break
    if getattr(model, _HOOK_ATTR, None) is None:
        handle = model.register_forward_pre_hook(_exact_attn_hook, with_kwargs=True)
        setattr(model, _HOOK_ATTR, handle)
    counts["attention"] = len(model.model.layers)
    return counts


def revert_exact(model: nn.Module) -> None:
    """Undo `convert_exact`: back to fast mode (library kernels), in place."""
    back = {exact: base for base, exact in _SWAPS}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.exact = False
        if type(mod) in back:
            mod.__class__ = back[type(mod)]
    handle = getattr(model, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(model, _HOOK_ATTR, None)


def is_exact(model: nn.Module) -> bool:
    return getattr(model, _HOOK_ATTR, None) is not None


def exact_mode_summary(model: nn.Module) -> dict[str, Any]:
    """Which modules of `model` would still run a batch-variant kernel in exact mode (for logs
    and the preflight): dense linears that are not ExactLinear, RMSNorms not ExactRMSNorm."""
    originals = tuple(base for base, _ in _SWAPS)
    leftover = [name for name, m in model.named_modules() if type(m) in originals]
    return {"exact": is_exact(model), "batch_variant_modules": leftover}
