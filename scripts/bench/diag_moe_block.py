"""Which MoE path was wrong in test_fused_moe_block_matches_loop[int4]/[nvfp4]? (GPU diagnosis;
session 33: neither, the test's loss had a noise gradient)

Three runs of the test's tiny Qwen3-MoE model on one batch: the per-expert loop, the fused
grouped kernel, and a reference where every QuantLinear multiplies by its cached dequantized
weight (cuBLAS, the kernels out of the picture). Each run's output and LoRA grads are printed
against the reference, per format and with the mma decode route on and off; then the same for
one block alone (fixed routing), and each expert MLP's dX on a slice of a larger tensor (as the
loop feeds it) against fp64.
Run (GPU): python3 scripts/bench/diag_moe_block.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))

from test_moe_gemm_gpu import _tiny_model  # noqa: E402  (the test's model, same seeds)

from orbit.kernels import _qgemm  # noqa: E402
from orbit.models.attention import (  # noqa: E402
    AttnBatch,
    cu_seqlens_from_lengths,
    positions_from_lengths,
)
from orbit.models.moe import MoERouting, set_fused_experts  # noqa: E402
from orbit.quant.linear import QuantLinear  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def set_reference(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache_dequantized = True if on else None
            m.clear_cache()


def whole_model(fmt: str, kw: dict) -> None:
    model, _ = _tiny_model(fmt, kw)
    lengths = [7, 12, 5]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 89, (sum(lengths),), generator=g).cuda()
    pos = positions_from_lengths(lengths).cuda()
    routing = MoERouting("record")
    attn = AttnBatch.packed(cu_seqlens_from_lengths(lengths).cuda(), routing=routing)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # a fixed projection: mean(h^2) after the final RMSNorm is ~1 whatever the input, so its
    # gradient is rounding noise (the test's old loss, and its 80-90% "mismatch")
    proj = torch.randn(sum(lengths), 256, generator=g).cuda()
    out = {}
    for name in ("reference", "loop", "fused"):
        set_reference(model, name == "reference")
        set_fused_experts(model, name == "fused")
        for _, p in trainable:
            p.grad = None
        h = model(ids, pos, attn)
        routing.mode = "replay"  # the loop and fused runs take the reference's experts
        (h.float() * proj).sum().backward()
        out[name] = (h.detach(), [p.grad.clone() for _, p in trainable])
    h_ref, g_ref = out["reference"]
    for name in ("loop", "fused"):
        h, gs = out[name]
        worst = max(zip((rel(a, b) for a, b in zip(gs, g_ref)), (n for n, _ in trainable)))
        print(f"  model {name:5}: h {rel(h, h_ref):.2e}  worst grad {worst[0]:.2e} ({worst[1]})")


def block_alone(fmt: str, kw: dict) -> None:
    model, _ = _tiny_model(fmt, kw)
    block = model.model.layers[0].mlp
    x0 = torch.randn(24, 256, device="cuda", dtype=torch.bfloat16)
    routing = MoERouting("record")
    res = {}
    for name in ("reference", "loop", "fused"):
        set_reference(model, name == "reference")
        block.fused_experts = name == "fused"
        x = x0.clone().requires_grad_(True)
        y = block(x, routing)
        routing.mode = "replay"
        dy = torch.randn(y.shape, device="cuda", dtype=y.dtype,
                         generator=torch.Generator("cuda").manual_seed(5))
        y.backward(dy)
        res[name] = (y.detach(), x.grad.clone())
    for name in ("loop", "fused"):
        print(f"  block {name:5}: y {rel(res[name][0], res['reference'][0]):.2e}  "
              f"dx {rel(res[name][1], res['reference'][1]):.2e}")
    # each expert MLP as the loop calls it: rows [s, s+n) of a larger tensor
    set_reference(model, False)
    worst = (0.0, -1, 0)
    for e, ex in enumerate(block.experts):
        for n in (1, 3, 6, 11):
            big = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
            xs = big[5 : 5 + n].detach().requires_grad_(True)
            y = ex(xs)
            dy = torch.randn_like(y)
            y.backward(dy)
            wg, wu, wd = (p.dequantize(torch.float64) for p in (ex.gate_proj, ex.up_proj,
                                                               ex.down_proj))
            xr = xs.detach().double().requires_grad_(True)
            yr = (torch.nn.functional.silu(xr @ wg.T) * (xr @ wu.T)) @ wd.T
            yr.backward(dy.double())
            r = max(rel(y, yr), rel(xs.grad, xr.grad))
            worst = max(worst, (r, e, n))
    print(f"  experts on slices: worst rel {worst[0]:.2e} (expert {worst[1]}, rows {worst[2]})")


def main() -> None:
    saved = dict(_qgemm.MMA_ROWS)
    for fmt, kw in (("int4", {"group_size": 64}), ("nvfp4", {}), ("fp8", {})):
        for routes in ("default", "no-mma"):
            _qgemm.MMA_ROWS.clear()
            if routes == "default":
                _qgemm.MMA_ROWS.update(saved)
            print(f"{fmt} routes={routes}")
            whole_model(fmt, kw)
            block_alone(fmt, kw)
    _qgemm.MMA_ROWS.update(saved)


if __name__ == "__main__":
    main()
