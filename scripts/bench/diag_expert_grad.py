"""One MoE expert's quantized linears at a few rows under autograd: forward and dX against an
fp64 dequantized reference, per format and route (diagnosis of test_fused_moe_block_matches_loop)."""
import torch

from orbit.kernels import _qgemm
from orbit.kernels.random_weights import random_qweight
from orbit.quant.linear import QuantLinear


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()

for routes in ("default", "no-mma"):
    if routes == "no-mma":
        _qgemm.MMA_ROWS.clear()
    for fmt, kw in (("int4", {"group_size": 64}), ("nvfp4", {}), ("fp8", {})):
        for (n, k) in ((128, 256), (256, 128)):
            qw = random_qweight(fmt, n, k, seed=1, device="cuda", **kw)
            lin = QuantLinear(qw)
            W = qw.dequantize().double()
            for m in (1, 3, 6, 9, 17):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                y = lin(x)
                dy = torch.randn_like(y)
                y.backward(dy)
                fy = rel(y, x.detach().double() @ W.T)
                fdx = rel(x.grad, dy.double() @ W)
                flag = "  <-- BAD" if max(fy, fdx) > 2e-2 else ""
                print(f"{routes:7} {fmt:5} n{n} k{k} m{m:2}: fwd {fy:.2e} dX {fdx:.2e}{flag}")
