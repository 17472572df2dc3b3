"""Fast-mode RMSNorm on CUDA runs the fused Triton kernel (orbit.kernels.rmsnorm_exact): same
values as the torch formula up to float32 summation order, the same gradients, and a result
per row that does not depend on the other rows."""

from __future__ import annotations

import pytest
import torch

from orbit.models.transformer import RMSNorm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _torch_formula(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.mark.parametrize("dim", [64, 128, 576, 2048, 2560])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_fused_rmsnorm_matches_torch_formula(dim: int, wdtype: torch.dtype) -> None:
    norm = RMSNorm(dim, 1e-6).cuda().to(wdtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, device="cuda") + 0.5)
    x = torch.randn(37, 3, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = norm(x)
    x2 = x.detach().clone().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    y2 = _torch_formula(x2, w2, 1e-6)
    assert y.dtype == y2.dtype and y.shape == y2.shape
    rel = ((y.double() - y2.double()).norm() / y2.double().norm()).item()
    assert rel < 4e-3, rel  # bf16 rounding of the normalised value, at most 1 ulp apart
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(norm.weight.grad, w2.grad)
    # row i alone == row i inside the batch, bit for bit
    with torch.no_grad():
        assert torch.equal(norm(x[5:6]), norm(x)[5:6])
