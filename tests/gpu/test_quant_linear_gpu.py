"""QuantLinear on CUDA: the uncached path goes through dispatch.qmm / qmm_t (fused kernels).

Checks forward and the dX-only backward against the float64 reference on the dequantized
weight, that nothing dense is cached, and that `.to("cuda")` moves every buffer.
"""

from __future__ import annotations

import pytest
import torch

from orbit.quant.linear import QuantLinear
from orbit.quant.quantize import quantize

pytestmark = pytest.mark.gpu

FMTS = [
    ("bf16", {}),
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": 32, "symmetric": False}),
    ("int8", {"group_size": 128}),
    ("fp8", {}),
    ("nvfp4", {}),
    ("mxfp4", {}),
]


@pytest.mark.parametrize("fmt,kw", FMTS, ids=[f"{f}-{k}" for f, k in FMTS])
@pytest.mark.parametrize("m", [1, 37, 256])
def test_quant_linear_cuda_forward_backward(fmt: str, kw: dict, m: int) -> None:
    g = torch.Generator().manual_seed(m)
    w = torch.randn(384, 512, generator=g) * 0.05
    layer = QuantLinear(quantize(w, fmt, **kw), torch.randn(384, generator=g)).to("cuda")
    assert all(b.is_cuda for b in layer.buffers())
    x = torch.randn(m, 512, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    dy = torch.randn(m, 384, generator=g).to("cuda", torch.bfloat16)
    y = layer(x)
    y.backward(dy)
    assert layer._dense == {}  # CUDA streams through the kernels by default
    wd = layer.dequantize(torch.float64)
    ref_y = x.detach().double() @ wd.T + layer.bias.double()
    ref_dx = dy.double() @ wd
    rel_y = float((y.double() - ref_y).norm() / ref_y.norm())
    rel_dx = float((x.grad.double() - ref_dx).norm() / ref_dx.norm())
    assert y.dtype == torch.bfloat16 and rel_y < 1e-2 and rel_dx < 1e-2, (rel_y, rel_dx)
    assert all(b.grad is None for b in layer.buffers())
