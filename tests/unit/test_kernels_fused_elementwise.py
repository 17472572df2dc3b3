"""The decode-launch fusions against their unfused form, in Triton's interpreter on fresh random
inputs: add + RMSNorm (orbit.kernels.rmsnorm_exact.add_rmsnorm_triton) must give exactly
`s = x + r` and the plain norm kernel's output on s; silu * up (orbit.kernels.swiglu) must
match `F.silu(g) * u` (bit for bit on the GPU, tests/gpu/test_fused_elementwise_gpu.py; the
interpreter's exp is numpy's, so here within one bf16 ulp)."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")


def _interpreter_main() -> None:
    patch_interpreter(bf16_round=True)
    from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton, rmsnorm_exact_triton
    from orbit.kernels.swiglu import silu_mul, silu_mul_reference

    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (rows, d, dt) in {"bf16": (5, 96, torch.bfloat16), "f32": (3, 64, torch.float32),
                                "odd": (4, 100, torch.bfloat16)}.items():
        x = torch.randn(rows, d, generator=g).to(dt)
        r = torch.randn(rows, d, generator=g).to(dt)
        w = (1 + 0.1 * torch.randn(d, generator=g)).to(dt)
        s, y = add_rmsnorm_triton(x, r, w, 1e-6)
        s_ref = x + r
        out[f"add-{name}"] = bool(torch.equal(s, s_ref))
        out[f"norm-{name}"] = bool(torch.equal(y, rmsnorm_exact_triton(s_ref, w, 1e-6)))
    for name, (shape, dt) in {"bf16": ((3, 200), torch.bfloat16),
                              "f16-3d": ((2, 3, 64), torch.float16)}.items():
        gg = 3 * torch.randn(*shape, generator=g).to(dt)
        u = torch.randn(*shape, generator=g).to(dt)
        y = silu_mul(gg, u)
        ref = silu_mul_reference(gg, u)
        ulp = (ref.float().abs() * 2.0 ** -7).clamp_min(1e-6)  # one bf16 ulp (fp16: 2^-10)
        out[f"swiglu-{name}"] = bool(y.shape == ref.shape and y.dtype == ref.dtype
                                     and ((y.float() - ref.float()).abs() <= ulp).all())
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", ["bf16", "f32", "odd"])
def test_add_rmsnorm_equals_add_then_norm(interp_results: dict, case: str) -> None:
    assert interp_results[f"add-{case}"] and interp_results[f"norm-{case}"]


@pytest.mark.parametrize("case", ["bf16", "f16-3d"])
def test_silu_mul_matches_torch(interp_results: dict, case: str) -> None:
    assert interp_results[f"swiglu-{case}"]


def test_cpu_model_path_unchanged() -> None:
    """On CPU the fused kernels are never taken: the torch expression runs."""
    from orbit.kernels.swiglu import silu_mul, silu_mul_available

    g, u = torch.randn(2, 8), torch.randn(2, 8)
    assert not silu_mul_available(g, u)
    assert torch.equal(silu_mul(g, u), torch.nn.functional.silu(g) * u)


if __name__ == "__main__":
    _interpreter_main()
