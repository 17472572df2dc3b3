"""One entry point for quantized matmuls, so the trainer and the engine call the same code.

On CPU (or without Triton) the reference runs: dequantize to the activation dtype, then a
plain matmul. On CUDA the fused Triton kernels run where they exist for the format.

`exact=True` selects the batch-invariant kernels: one fixed tile config for every M and no
split-K, so row i of the output does not depend on which other rows share the batch.

`act_quant="fp8"` (fp8 weights only) runs W8A8: activations are quantized per token per 128
columns to e4m3 and an FP8 GEMM applies both block scales. Its gradient is straight-through:
`qmm_t` always computes dX = dY @ W with the dequantized (W8A16-style) weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.kernels.norm_prologue import NormPrologue
from orbit.quant.qweight import QuantizedWeight

ACT_QUANT_MODES = (None, "fp8")


def qmm_reference(x: Tensor, qw: QuantizedWeight) -> Tensor:
    """x [M, in] @ W^T -> [M, out] in x.dtype."""
    return x @ qw.dequantize(x.dtype).T


def qmm_t_reference(dy: Tensor, qw: QuantizedWeight) -> Tensor:
    """dy [M, out] @ W -> [M, in] in dy.dtype (the input gradient)."""
    return dy @ qw.dequantize(dy.dtype)


def _kernel_for(qw: QuantizedWeight) -> Callable[..., Tensor] | None:
    """The fused Triton matmul for this format, or None where cuBLAS/the reference is right."""
    from orbit.kernels._triton import HAS_TRITON

    if not HAS_TRITON:
        return None
    if qw.fmt == "int4":
        from orbit.kernels.int4 import int4_matmul
        return int4_matmul
    if qw.fmt == "int8":
        from orbit.kernels.int8 import int8_matmul
        return int8_matmul
    if qw.fmt == "fp8":
        from orbit.kernels.fp8 import fp8_matmul
        return fp8_matmul
    if qw.fmt == "nvfp4":
        from orbit.kernels.fp4 import nvfp4_matmul
        return nvfp4_matmul
    if qw.fmt == "mxfp4":
        from orbit.kernels.fp4 import mxfp4_matmul
        return mxfp4_matmul
    if qw.fmt == "bf16":
        from orbit.kernels._qgemm import bf16_matmul
        return bf16_matmul
    return None


def _on_gpu(x: Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def qmm(x: Tensor, qw: QuantizedWeight, exact: bool = False, *,
        act_quant: str | None = None) -> Tensor:
    assert x.dim() == 2 and x.shape[1] == qw.shape[1], (x.shape, qw.shape)
    if act_quant not in ACT_QUANT_MODES:
        raise ValueError(f"act_quant must be one of {ACT_QUANT_MODES}, got {act_quant!r}")
    if act_quant == "fp8":
        if qw.fmt != "fp8":
            raise ValueError(f"act_quant='fp8' needs an fp8 weight, got {qw.fmt!r}")
        from orbit.kernels.fp8 import w8a8_matmul, w8a8_matmul_reference

        if _on_gpu(x):
            return w8a8_matmul(x.contiguous(), qw, exact=exact)
        return w8a8_matmul_reference(x, qw, exact=exact)
    if _on_gpu(x):
        if qw.fmt == "bf16" and not exact and qw.tensors["weight"].dtype == x.dtype:
            return x @ qw.tensors["weight"].T  # cuBLAS; same values as the reference
        kernel = _kernel_for(qw)
        if kernel is not None and (qw.fmt != "bf16" or qw.tensors["weight"].dtype == x.dtype):
            return kernel(x.contiguous(), qw, exact=exact)
    return qmm_reference(x, qw)


def _fused_store_input(x: Tensor) -> bool:
    """x can go to a Triton kernel that does extra work in its store (a LoRA delta, SwiGLU):
    a 2-D bf16/fp16 input on CUDA, or on the CPU under Triton's interpreter (tests)."""
    from orbit.kernels._triton import HAS_TRITON
    from orbit.kernels.matmul_exact import interpreting

    return (HAS_TRITON and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16)
            and (x.is_cuda or interpreting()))


def mma_operands_ok(x: Tensor, qw: QuantizedWeight) -> bool:
    """x @ W^T can run int4_mma (within its format's `_qgemm.MMA_ROWS` it is then routed
    there), whose store takes no epilogue: the *_foldable questions answer for that route."""
    from orbit.kernels import int4_mma
    from orbit.kernels._qgemm import mma_operands_fit

    if qw.fmt not in int4_mma.FORMATS:  # (other formats keep no "scale" tensor to ask about)
        return False
    q, s, group, _ = int4_mma.weight_operands(qw)
    return mma_operands_fit(x, qw.fmt, qw.shape, q, s, qw.tensors.get("offset"), group)


def _mma_ok_with_lora(x: Tensor, qw: QuantizedWeight) -> bool:
    """mma_ok for a forward that carries a LoRA delta: from `_qgemm.MMA_WITH_LORA_MIN_M` rows
    (then the mma kernel runs it and the delta goes to separate launches); fewer rows keep
    their fused-epilogue kernel (measured faster there, or equal)."""
    from orbit.kernels import _qgemm

    return (x.dim() == 2 and x.shape[0] >= _qgemm.MMA_WITH_LORA_MIN_M
            and mma_operands_ok(x, qw))


def lora_foldable(x: Tensor, qw: QuantizedWeight, members: int = 1) -> bool:
    """Whether `qmm_lora(x, qw, ...)` runs for a LoRA epilogue of `members` adapters: the
    fast-mode forward of x [M, in] on this weight is a fused kernel that adds the delta in its
    store (the decode GEMV, or for one member the `tl.dot` loop below the dequantize-then-
    cuBLAS sizes) on CUDA, or under Triton's interpreter in CPU tests."""
    from orbit.kernels._qgemm import lora_fits

    return _fused_store_input(x) and lora_fits(x.shape[0], qw.shape[0], qw.shape[1], qw.fmt,
                                               False, x.device, members,
                                               _mma_ok_with_lora(x, qw))


def lora_shrink_in_kernel(x: Tensor, qw: QuantizedWeight) -> bool:
    """Whether `qmm_lora(x, qw, LoRAEpilogue(..., a=...))` computes h within its one launch
    (the plane and FP8 decode GEMVs and the `tl.dot` loop); elsewhere (the tile GEMV) it runs
    a shrink launch first."""
    from orbit.kernels._qgemm import use_gemv
    from orbit.kernels.gemv import shrinks_in_kernel

    m = x.shape[0]
    if not lora_foldable(x, qw):
        return False
    return not use_gemv(m, qw.shape[0], qw.shape[1], qw.fmt, x.device,
                        _mma_ok_with_lora(x, qw)) or shrinks_in_kernel(m, qw.fmt)


def qmm_lora(x: Tensor, qw: QuantizedWeight, lora: LoRAEpilogue) -> Tensor:
    """x @ W^T plus a LoRA delta (orbit/kernels/lora_epilogue.py) in one fast-mode launch;
    only where `lora_foldable(x, qw, len(lora.b))`."""
    kernel = _kernel_for(qw)
    if kernel is None or not lora_foldable(x, qw, len(lora.b)):
        raise ValueError(f"qmm_lora: a {qw.fmt} {tuple(qw.shape)} forward of {tuple(x.shape)} "
                         f"{x.dtype} on {x.device} with {len(lora.b)} adapter(s) has no fused "
                         "kernel that takes a LoRA epilogue")
    return kernel(x.contiguous(), qw, lora=lora)


def _mma_swiglu(x: Tensor, qw: QuantizedWeight) -> bool:
    """`qmm_swiglu` on the tensor-core kernel: `_qgemm.MMA_SWIGLU` is on, the forward of x on
    the stacked gate/up weight is routed to int4_mma, and its SwiGLU store runs there (one
    program per tile: int4_mma.swiglu_fits)."""
    from orbit.kernels import _qgemm, int4_mma

    if not (_qgemm.MMA_SWIGLU and x.is_cuda and x.dim() == 2 and mma_operands_ok(x, qw)):
        return False
    from orbit.kernels.gemv import num_sms

    m, (n, k) = x.shape[0], qw.shape
    if _qgemm.route(m, n, k, qw.fmt, False, x.device, mma_ok=True).kind != "mma":
        return False
    _, _, group, _ = int4_mma.weight_operands(qw)
    return int4_mma.swiglu_fits(m, k, n, group, num_sms(x.device), qw.fmt)


def _plane_swiglu(x: Tensor, qw: QuantizedWeight, lora: bool) -> bool:
    """`qmm_swiglu` on the nibble-plane decode GEMV, which stores SwiGLU's output itself (CUDA,
    or Triton's interpreter in CPU tests). `lora`: the launch also carries the gate/up
    adapters' deltas (`_mma_ok_with_lora` decides the route then)."""
    from orbit.kernels._qgemm import swiglu_fits

    mma_ok = _mma_ok_with_lora(x, qw) if lora else mma_operands_ok(x, qw)
    return _fused_store_input(x) and swiglu_fits(x.shape[0], qw.shape[0], qw.shape[1], qw.fmt,
                                                 False, x.device, mma_ok)


def swiglu_foldable(x: Tensor, qw: QuantizedWeight, lora: bool = False) -> bool:
    """Whether `qmm_swiglu(x, qw)` runs: qw is a stacked gate/up weight (gate rows first) whose
    fast-mode forward of x stores SwiGLU's output in one launch, on the tensor-core kernel
    (without `lora`: `_mma_swiglu`) or on the plane GEMV (`_plane_swiglu`)."""
    return (not lora and _mma_swiglu(x, qw)) or _plane_swiglu(x, qw, lora)


def qmm_swiglu(x: Tensor, qw: QuantizedWeight, lora: LoRAEpilogue | None = None) -> Tensor:
    """silu(x @ W_gate^T) * (x @ W_up^T) [M, out / 2] for qw the stacked gate/up weight, in one
    launch (with `lora`, the gate/up adapters' deltas added before SwiGLU); only where
    `swiglu_foldable(x, qw)`."""
    if lora is None and _mma_swiglu(x, qw):
        from orbit.kernels.int4_mma import int4_mma_weight

        return int4_mma_weight(x.contiguous(), qw, swiglu=True)
    kernel = _kernel_for(qw)
    if kernel is None or not _plane_swiglu(x, qw, lora is not None):
        raise ValueError(f"qmm_swiglu: a {qw.fmt} {tuple(qw.shape)} forward of "
                         f"{tuple(x.shape)} {x.dtype} on {x.device} is not the plane GEMV "
                         f"or the tensor-core kernel with its SwiGLU store")
    return kernel(x.contiguous(), qw, lora=lora, swiglu=True)


def norm_foldable(x: Tensor, qw: QuantizedWeight) -> bool:
    """Whether `qmm_add_norm(x, qw, ...)` runs: the fast-mode forward of x on this weight is
    the decode GEMV (CUDA, or Triton's interpreter in CPU tests), whose last program can do
    the residual add + RMSNorm (orbit/kernels/norm_epilogue.py)."""
    from orbit.kernels._qgemm import norm_fits

    return _fused_store_input(x) and norm_fits(x.shape[0], qw.shape[0], qw.shape[1], qw.fmt,
                                               False, x.device, mma_operands_ok(x, qw))


def qmm_add_norm(x: Tensor, qw: QuantizedWeight, residual: Tensor, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    """(s, rmsnorm(s) * weight) with s = residual + x @ W^T, in one launch:
    the decoder's residual add and next norm folded into the GEMV that makes the delta; only
    where `norm_foldable(x, qw)`. The delta itself is not returned (only s reads it)."""
    kernel = _kernel_for(qw)
    if kernel is None or not norm_foldable(x, qw):
        raise ValueError(f"qmm_add_norm: a {qw.fmt} {tuple(qw.shape)} forward of "
                         f"{tuple(x.shape)} {x.dtype} on {x.device} is not the decode GEMV")
    norm = NormEpilogue.make(residual.reshape(x.shape[0], qw.shape[0]), weight, eps)
    kernel(x.contiguous(), qw, norm=norm)
    return norm.s, norm.out


def prenorm_foldable(delta: Tensor, qw: QuantizedWeight) -> bool:
    """Whether `qmm_prenorm(delta, qw, ...)` runs: the fast-mode forward of a [M, in] input on
    this weight is the nibble-plane decode GEMV (CUDA, or Triton's interpreter in CPU tests),
    which can build its input from a residual add + RMSNorm itself
    (orbit/kernels/norm_prologue.py), and the format is one the engine folds
    (norm_prologue.PROLOGUE_FORMATS: where the fold measured faster)."""
    from orbit.kernels import norm_prologue
    from orbit.kernels._qgemm import prenorm_fits

    return (qw.fmt in norm_prologue.PROLOGUE_FORMATS and _fused_store_input(delta)
            and prenorm_fits(delta.shape[0], qw.shape[0], qw.shape[1], qw.fmt, False,
                             delta.device, mma_operands_ok(delta, qw)))


def qmm_prenorm(delta: Tensor, qw: QuantizedWeight, residual: Tensor, weight: Tensor,
                eps: float, swiglu: bool = False) -> tuple[Tensor, Tensor]:
    """(s, rmsnorm(s) * weight @ W^T) with s = residual + delta, in one launch: the decoder's
    residual add and this GEMV's input norm done by the GEMV (with `swiglu`, qw the stacked
    gate/up weight: silu(gate) * up of that input, as `qmm_swiglu`); only where
    `prenorm_foldable(delta, qw)`."""
    kernel = _kernel_for(qw)
    if kernel is None or not prenorm_foldable(delta, qw):
        raise ValueError(f"qmm_prenorm: a {qw.fmt} {tuple(qw.shape)} forward of "
                         f"{tuple(delta.shape)} {delta.dtype} on {delta.device} is not the "
                         "nibble-plane decode GEMV")
    pre = NormPrologue.make(residual.reshape(delta.shape), weight, eps)
    y = kernel(delta.contiguous(), qw, swiglu=swiglu, norm=pre)
    return pre.s, y


def qmm_t(dy: Tensor, qw: QuantizedWeight, exact: bool = False) -> Tensor:
    assert dy.dim() == 2 and dy.shape[1] == qw.shape[0], (dy.shape, qw.shape)
    if _on_gpu(dy):
        if qw.fmt == "bf16" and not exact and qw.tensors["weight"].dtype == dy.dtype:
            return dy @ qw.tensors["weight"]
        kernel = _kernel_for(qw)
        if kernel is not None and (qw.fmt != "bf16" or qw.tensors["weight"].dtype == dy.dtype):
            return kernel(dy.contiguous(), qw, transpose=True, exact=exact)
    return qmm_t_reference(dy, qw)
