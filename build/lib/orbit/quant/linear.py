"""QuantLinear: a frozen linear layer whose weight lives in a low-precision `QuantizedWeight`.

The base model never trains, so this module has buffers and no parameters: nothing for the
optimizer, no `.grad`, no master copy. Gradients flow to the input only (`dX = dY @ W`), which
is all the adapter wrapped around it needs. On CUDA both directions go through
`orbit.kernels.dispatch` (fused dequantize-GEMM, the weight is never materialized); on CPU the
dequantized weight is cached per dtype so a decode step does not re-unpack every nibble, and
the result is bit for bit the reference `x @ dequantize(qw).to(x.dtype).T`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from orbit.kernels import dispatch
from orbit.quant.qweight import QuantizedWeight

# Largest row count the sibling-group path serves (orbit.quant.siblings): the decode rows the
# GEMV kernels take (_qgemm.GEMV_MAX_M). H100, Qwen3-1.7B, one run: batch 1 decode +7% INT4,
# +24% FP8, +20% NVFP4; batch 16 (tl.dot path) -4% INT4 / -5% NVFP4, so larger M launches per
# layer (docs/benchmarks.md). BF16 groups serve every M: they are one cuBLAS GEMM over the
# stacked rows instead of two or three, and at M = 16-256 the separate q/k/v GEMMs of a 1-2B
# model are too narrow to fill the GPU (H200, Qwen3-1.7B, batch 64: k_proj's 2048x1024 GEMM
# ran at 0.7 TB/s; docs/benchmarks.md has the grouped numbers).
SIBLING_MAX_M = 4
# Quantized groups also serve the rows where fast mode dequantizes and runs cuBLAS
# (`_qgemm.dequant_min_m(fmt)` on: rollout batches, prefill chunks), for the BF16 groups'
# reason: one dequantize pass and one cuBLAS GEMM over the stacked rows instead of two or
# three of each (14 -> 8 launches per Qwen3-1.7B layer), and wider GEMMs. H100, Qwen3-1.7B,
# session 26 (`bench_engine.py --sections lora --knob ...SIBLING_FROM_DEQUANT=False,True`):
# INT4 and NVFP4 decode +5.7% to +6.6% at batch 64 / 256 adapter off, +4.8% to +5.7% with
# LoRA (docs/benchmarks.md). Kept as a knob for comparisons.
SIBLING_FROM_DEQUANT = True


def sibling_serves(fmt: str, rows: int) -> bool:
    """Whether a sibling group of format `fmt` runs its one launch for `rows` input rows:
    BF16 at any M; the quantized formats at decode rows (<= SIBLING_MAX_M) and from the rows
    where fast mode dequantizes + runs cuBLAS (with SIBLING_FROM_DEQUANT)."""
    if fmt == "bf16" or rows <= SIBLING_MAX_M:
        return True
    from orbit.kernels._qgemm import dequant_min_m  # (read at each call: a measured knob)

    return SIBLING_FROM_DEQUANT and rows >= dequant_min_m(fmt)


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T with dX = dY @ W and no gradient for anything else."""

    @staticmethod
    def forward(ctx, x2d: Tensor, layer: QuantLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer._matmul(x2d)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.layer._matmul_t(dy.contiguous()), None


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W a frozen `QuantizedWeight` [out, in] and b a frozen bias."""

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: Tensor | None = None,
        cache_dequantized: bool | None = None,
    ) -> None:
        super().__init__()
        out_f, in_f = qw.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        self.in_features = in_f
        self.out_features = out_f
        self.weight_format = qw.fmt
        self.group_size = qw.group_size
        # None: cache on CPU (reference path), stream through the fused kernel on CUDA.
        self.cache_dequantized = cache_dequantized
        self.exact = False  # batch-invariant kernels (precision "exact" mode)
        # "fp8" = W8A8: activations quantized per token per 128 columns, as deployment engines
        # run FP8 checkpoints; the backward is straight-through (dX through the dequantized W).
        self.act_quant: str | None = None
        self._tensor_names = tuple(qw.tensors)
        for name, t in qw.tensors.items():
            self.register_buffer(name, t.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        self._dense: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        # new packed buffers from a state dict make the dense copies stale (as SparseMoeBlock)
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod.clear_cache())
        # orbit.quant.siblings.SiblingGroup when fuse_siblings stacked this layer's buffers with
        # those of the projections that read the same input (q/k/v, gate/up).
        self._sibling: Any = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str,
        group_size: int | None = None,
        symmetric: bool = True,
        **kw,
    ) -> QuantLinear:
        from orbit.quant.quantize import quantize

        qw = quantize(linear.weight.detach(), fmt, group_size=group_size, symmetric=symmetric)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(qw, bias, **kw)

    def quantized_weight(self) -> QuantizedWeight:
        """The weight as a `QuantizedWeight` over this module's (current-device) buffers."""
        tensors = {n: getattr(self, n) for n in self._tensor_names}
        # checked once, when the module was built from a QuantizedWeight; `_apply` keeps the
        # dtypes and a state-dict load keeps the shapes
        return QuantizedWeight.trusted(
            self.weight_format, (self.out_features, self.in_features), tensors, self.group_size
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Reference dense weight [out, in]."""
        return self.quantized_weight().dequantize(dtype)

    def clear_cache(self) -> None:
        self._dense.clear()

    def _apply(self, fn, recurse: bool = True):
        self._dense.clear()  # buffers may move or change dtype; drop stale dense copies
        if self._sibling is not None:  # moved buffers are no longer views of the stacked ones
            self._sibling.unlink()
        before = {n: self._buffers[n] for n in self._tensor_names}
        out = super()._apply(fn, recurse)
        # `model.to(torch.bfloat16)` / `.half()` cast every floating buffer: fp8 codes, fp32
        # scales and offsets would change the frozen weight. They keep their storage dtypes
        # (the format's layout) and only follow the move; the bias does take the new dtype.
        for n, t0 in before.items():
            t1 = self._buffers[n]
            if t0 is not None and t1 is not None and t1.dtype != t0.dtype:
                self._buffers[n] = t0.to(device=t1.device)
        return out

    def _use_cache(self, device: torch.device) -> bool:
        if self.cache_dequantized is None:
            return device.type == "cpu"
        return self.cache_dequantized

    def _dense_weight(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        w = self._dense.get(key)
        if w is None:
            w = self.quantized_weight().dequantize(dtype)
            self._dense[key] = w
        return w

    def _matmul(self, x2d: Tensor) -> Tensor:
        if self.act_quant is not None:
            return dispatch.qmm(x2d, self.quantized_weight(), exact=self.exact,
                                act_quant=self.act_quant)
        if self._use_cache(x2d.device):
            return x2d @ self._dense_weight(x2d.dtype, x2d.device).T
        return dispatch.qmm(x2d, self.quantized_weight(), exact=self.exact)

    def _matmul_t(self, dy2d: Tensor) -> Tensor:
        if self._use_cache(dy2d.device):
            return dy2d @ self._dense_weight(dy2d.dtype, dy2d.device)
        return dispatch.qmm_t(dy2d, self.quantized_weight(), exact=self.exact)

    def _grouped(self, x: Tensor, x2d: Tensor) -> Tensor | None:
        """This layer's rows of its sibling group's one-launch output (fast-mode engine calls
        only; exact mode keeps its own fixed-config launch), else None. Only inference-mode
        forwards (the rollout engine's) group: a trainer forward, with or without grad, runs
        the separate launches, so the no-grad "old" log-probs of a rollout equal the training
        forward's bit for bit (a grouped GEMM may pick another cuBLAS tile)."""
        # (Not where the dense-weight cache serves: the CPU reference path keeps its matmuls.)
        if (self._sibling is None or not torch.is_inference_mode_enabled()
                or self._use_cache(x2d.device) or self.exact
                or self.act_quant is not None or not sibling_serves(self.weight_format, x2d.shape[0])):
            return None
        return self._sibling.output(self, x, x2d)

    def fused_output(self, device: torch.device) -> bool:
        """Whether this layer's fast-mode forward on `device` is one quantized-kernel launch
        whose output nothing else touches (no bias add, no W8A8 activation quantizer, no dense
        weight cache, not exact mode, not a BF16 passthrough, which cuBLAS runs): a LoRA
        delta may then be added in that kernel's store (orbit/adapters/lora_decode.py)."""
        return (self.bias is None and not self.exact and self.act_quant is None
                and self.weight_format != "bf16" and not self._use_cache(device))

    def _fused_group(self, members: list[nn.Module], x2d: Tensor) -> Any:
        """This layer's sibling group where its members are exactly `members` (this layer
        first) and it would run grouped (`_grouped`'s rules: inference mode, decode rows) as
        one fused quantized launch for x2d whose output nothing else touches (every member's
        `fused_output`, still linked); else None."""
        group = self._sibling
        if (group is None or not group.enabled or group.members != members
                or not torch.is_inference_mode_enabled()
                or not all(m.fused_output(x2d.device) and group.linked(m) for m in members)
                or not sibling_serves(self.weight_format, x2d.shape[0])):
            return None
        return group

    def _stacked_with(self, up: nn.Module, x2d: Tensor) -> QuantizedWeight | None:
        """The stacked gate/up weight where this layer and `up` are that sibling group of
        equal halves and `_fused_group` holds; else None."""
        group = self._fused_group([self, up], x2d)
        if group is None or up.out_features != self.out_features:
            return None
        return group.qweight

    def swiglu_with(self, up: nn.Module, x: Tensor) -> Tensor | None:
        """silu(self(x)) * up(x) from one launch, where this layer and `up` are the stacked
        gate/up sibling group (`_stacked_with`) and it would run as the nibble-plane decode
        GEMV, which stores SwiGLU itself (dispatch.qmm_swiglu: the same bits as the separate
        launches); else None."""
        x2d = x.reshape(-1, self.in_features)
        qw = self._stacked_with(up, x2d)
        if qw is None or not dispatch.swiglu_foldable(x2d, qw):
            return None
        return dispatch.qmm_swiglu(x2d, qw).reshape(*x.shape[:-1], self.out_features)

    def mlp_chain_with(self, up: nn.Module, down: nn.Module, x: Tensor) -> Tensor | None:
        """down(silu(self(x)) * up(x)) from one persistent launch (orbit/kernels/gemv_chain.py:
        the gate/up plane GEMV with SwiGLU, then the down GEMV, bit for bit the separate
        launches), where this layer and `up` are the stacked gate/up sibling group
        (`_stacked_with`), `down` a lone quantized layer whose output is its own launch, and
        both forwards would be the plane decode GEMVs (`gemv_chain.mlp_chain_fits`); else
        None."""
        from orbit.kernels.gemv_chain import mlp_chain, mlp_chain_fits

        x2d = x.reshape(-1, self.in_features)
        if (not isinstance(down, QuantLinear) or down._sibling is not None
                or not down.fused_output(x2d.device)):
            return None
        qw, dq = self._stacked_with(up, x2d), down.quantized_weight()
        if qw is None or not mlp_chain_fits(x2d, qw, dq):
            return None
        return mlp_chain(x2d, qw, dq).reshape(*x.shape[:-1], down.out_features)

    def prenorm_siblings_with(self, others: list[nn.Module], delta: Tensor, residual: Tensor,
                              weight: Tensor, eps: float) -> tuple[Tensor, list[Tensor]] | None:
        """(s, [every member's output for rmsnorm(s) * weight]) with s = residual + delta, from
        one launch, where this layer and `others` are its sibling group in order (q/k/v), each
        member's output is the group's launch alone (`fused_output`), and that launch would be
        the nibble-plane decode GEMV, which then does the add + norm itself
        (dispatch.qmm_prenorm, orbit/kernels/norm_prologue.py); else None."""
        d2 = delta.reshape(-1, self.in_features)
        group = self._fused_group([self, *others], d2)
        if (group is None or weight.dtype != delta.dtype
                or not dispatch.prenorm_foldable(d2, group.qweight)):
            return None
        s, y = dispatch.qmm_prenorm(d2, group.qweight, residual, weight, eps)
        lead = delta.shape[:-1]
        return (s.reshape(residual.shape),
                [t.reshape(*lead, t.shape[-1]) for t in torch.split(y, group.splits, dim=1)])

    def swiglu_prenorm_with(self, up: nn.Module, delta: Tensor, residual: Tensor,
                            weight: Tensor, eps: float) -> tuple[Tensor, Tensor] | None:
        """(s, silu(self(x)) * up(x)) with s = residual + delta and x = rmsnorm(s) * weight,
        from one launch, where `swiglu_with` would run and the GEMV can also do the add + norm
        (dispatch.qmm_prenorm with swiglu, orbit/kernels/norm_prologue.py); else None."""
        d2 = delta.reshape(-1, self.in_features)
        qw = self._stacked_with(up, d2)
        if (qw is None or weight.dtype != delta.dtype or not dispatch.swiglu_foldable(d2, qw)
                or not dispatch.prenorm_foldable(d2, qw)):
            return None
        s, act = dispatch.qmm_prenorm(d2, qw, residual, weight, eps, swiglu=True)
        return s.reshape(residual.shape), act.reshape(*delta.shape[:-1], self.out_features)

    def add_norm_with(self, x: Tensor, residual: Tensor, weight: Tensor,
                      eps: float) -> tuple[Tensor, Tensor] | None:
        """(s, rmsnorm(s) * weight) with s = residual + self(x), from this layer's one launch,
        where its forward would be the decode GEMV in the engine (inference mode, the fused
        output rules of `fused_output`, no sibling group): the GEMV's last program does the
        add and the norm (dispatch.qmm_add_norm); else None (the caller runs them apart)."""
        x2d = x.reshape(-1, self.in_features)
        if (self._sibling is not None or not torch.is_inference_mode_enabled()
                or not self.fused_output(x2d.device)):
            return None
        qw = self.quantized_weight()
        if not dispatch.norm_foldable(x2d, qw):
            return None
        s, out = dispatch.qmm_add_norm(x2d, qw, residual, weight, eps)
        return s.reshape(residual.shape), out.reshape(residual.shape)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"QuantLinear expects input [..., {self.in_features}], got {tuple(x.shape)}"
            )
        x2d = x.reshape(-1, self.in_features)  # [M, in]
        if torch.is_grad_enabled() and x2d.requires_grad:
            y = _QuantMatmul.apply(x2d, self)
        else:
            y = self._grouped(x, x2d)
            if y is None:
                y = self._matmul(x2d)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.weight_format in ("int4", "int8") else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.weight_format}{g}, bias={self.bias is not None}"
        )
