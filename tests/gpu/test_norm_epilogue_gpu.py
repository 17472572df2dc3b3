"""The residual add + RMSNorm folded into the decode GEMV (orbit/kernels/norm_epilogue.py) on
CUDA, at the Qwen3-1.7B o_proj / down_proj shapes: every row written, the GEMV's output
unchanged, and (s, norm) against the separate add_rmsnorm launch on the same y: s bit for
bit (one rounded add), the normed rows bit for bit where the GEMV launches with the norm
kernel's 4 warps (the row reduction's layout), else within one bf16 ulp. Repeated launches
(graph replays re-arm the counter) give the same bits; and an engine decodes the same tokens
with the fold on and off."""

from __future__ import annotations

import pytest
import torch

from orbit.kernels import gemv
from orbit.kernels.gemv_fp8 import pick_fp8_gemv_config
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.kernels.random_weights import random_qweight
from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

EPS = 1e-6


def _warps(fmt: str, m: int, n: int, k: int) -> int:
    if fmt == "fp8" and m <= gemv.FP8_GEMV_MAX_M:
        return pick_fp8_gemv_config(m, n, k, gemv.num_sms(torch.device("cuda"))).warps
    return gemv.pick_gemv_config(m, n, k, fmt, gemv.num_sms(torch.device("cuda"))).warps


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "fp8"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("k,n", [(2048, 2048), (6144, 2048)])
def test_folded_norm_matches_separate_launch(fmt: str, m: int, k: int, n: int) -> None:
    torch.manual_seed(k + n + m)
    qw = random_qweight(fmt, n, k, device="cuda")
    t = qw.tensors
    q = t.get("qweight", t.get("weight"))
    s = t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
    group = {"nvfp4": 16, "fp8": 128}.get(fmt, qw.group_size)
    x = torch.randn(m, k, device="cuda").bfloat16()
    res = (4 * torch.randn(m, n, device="cuda")).bfloat16()
    w = (1 + 0.3 * torch.randn(n, device="cuda")).bfloat16()
    args = (x, fmt, qw.shape, q, s, t.get("offset"), gs, group)
    nan = torch.full((m, n), float("nan"), device="cuda").bfloat16()
    y = gemv.gemv(*args, nan.clone())
    want_s, want_out = add_rmsnorm_triton(res, y, w, EPS)
    outs = []
    for _ in range(3):  # the counter is re-armed by each launch
        norm = NormEpilogue(res, w, EPS, nan.clone(), nan.clone())
        y2 = gemv.gemv(*args, nan.clone(), norm=norm)
        assert torch.equal(y2, y)
        assert not norm.s.isnan().any() and not norm.out.isnan().any()
        assert torch.equal(norm.s, want_s)
        outs.append(norm.out)
    assert all(torch.equal(o, outs[0]) for o in outs)
    if _warps(fmt, m, n, k) == 4:
        assert torch.equal(outs[0], want_out)
    else:
        ulp = want_out.float().abs() * 2.0 ** -7
        assert ((outs[0].float() - want_out.float()).abs() <= ulp).all()


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_engine_tokens_equal_with_and_without_fold(fmt: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_models import bits, engine_on_off

    from orbit.kernels import _qgemm

    # the fold runs where the GEMV does: without the mma route (NVFP4's rows take it first)
    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})

    on, off = engine_on_off(fmt, "fold_norm", 2, 5)
    # 4-warp GEMVs give the separate launch's bits (above); the tokens, at least, agree
    assert [c.tokens for c in on] == [c.tokens for c in off]
    lp_on = torch.tensor([v for _, lps in bits(on) for v in lps])
    lp_off = torch.tensor([v for _, lps in bits(off) for v in lps])
    assert (lp_on - lp_off).abs().max() < 1e-2
