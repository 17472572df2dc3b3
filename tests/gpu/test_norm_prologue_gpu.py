"""The residual add + RMSNorm folded into the GEMV that reads the normed row
(orbit/kernels/norm_prologue.py) on CUDA, at the Qwen3-1.7B q/k/v and gate/up (SwiGLU) shapes:
every element written, s bit for bit the separate add_rmsnorm launch's, and y bit for bit the
GEMV of that launch's normed row where the GEMV runs the norm kernel's 4 warps (the row
reduction's layout), else close; repeated launches give the same bits; an engine decodes the
same tokens with Engine(fold_norm="prologue") and without."""

from __future__ import annotations

import pytest
import torch

from orbit.kernels import gemv, norm_prologue
from orbit.kernels.norm_prologue import NormPrologue
from orbit.kernels.random_weights import gemv_operands, random_qweight
from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EPS = 1e-6


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,swiglu", [(4096, False), (12288, True)])
def test_prologue_matches_separate_launches(fmt: str, m: int, n: int, swiglu: bool) -> None:
    k = 2048
    torch.manual_seed(n + m)
    args = gemv_operands(random_qweight(fmt, n, k, device="cuda"))
    delta = torch.randn(m, k, device="cuda").bfloat16()
    res = (4 * torch.randn(m, k, device="cuda")).bfloat16()
    w = (1 + 0.3 * torch.randn(k, device="cuda")).bfloat16()
    want_s, x = add_rmsnorm_triton(res, delta, w, EPS)
    nan = torch.full((m, n // 2 if swiglu else n), float("nan"), device="cuda").bfloat16()
    y = gemv.gemv(x, *args, nan.clone(), swiglu=swiglu)
    outs = []
    for _ in range(3):
        pre = NormPrologue(res, w, EPS, torch.full_like(res, float("nan")))
        y2 = gemv.gemv(delta, *args, nan.clone(), swiglu=swiglu, norm=pre)
        assert not y2.isnan().any() and torch.equal(pre.s, want_s)
        outs.append(y2)
    assert all(torch.equal(o, outs[0]) for o in outs)
    warps = gemv.pick_gemv_config(m, n, k, fmt, gemv.num_sms(torch.device("cuda"))).warps
    if warps == 4:
        assert torch.equal(outs[0], y)
    else:
        torch.testing.assert_close(outs[0].float(), y.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_engine_tokens_equal_with_and_without_prologue(fmt: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_models import bits, engine_on_off

    from orbit.kernels import _qgemm

    # the engine folds only the measured-faster formats; the fold must be exact for all (and
    # runs where the GEMV does: without the mma route, which NVFP4's batch 1 takes first)
    monkeypatch.setattr(norm_prologue, "PROLOGUE_FORMATS", ("int4", "nvfp4", "mxfp4"))
    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})

    on, off = engine_on_off(fmt, "fold_norm", 1, 5, on_value="prologue")
    assert [c.tokens for c in on] == [c.tokens for c in off]
    lp_on = torch.tensor([v for _, lps in bits(on) for v in lps])
    lp_off = torch.tensor([v for _, lps in bits(off) for v in lps])
    assert (lp_on - lp_off).abs().max() < 1e-2
