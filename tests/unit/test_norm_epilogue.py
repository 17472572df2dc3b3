"""CPU checks of the residual add + RMSNorm folded into the decode GEMV (orbit/kernels/
norm_epilogue.py) under Triton's interpreter: on fresh random inputs into NaN-poisoned
outputs, for the nibble-plane formats (deferred and per-step, with and without split-K, tail
tiles, 1-3 rows), the FP8 GEMV and the tile GEMV, with and without a LoRA epilogue, the
launch's (s, norm) equal the GEMV followed by the separate add_rmsnorm launch bit for bit; and
a tiny INT4 model in inference mode takes the fold for every o_proj and down_proj with the
logits of the separate launches."""

from __future__ import annotations

import pytest
import torch
from triton_interp import print_kernel_and_model_results, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, K, N, M, GemvConfig args or None)
CASES = [
    ("int4", {"group_size": 32}, 256, 48, 1, None),  # deferred planes, tail tile
    ("int4", {"group_size": 32}, 256, 40, 1, (32, 64, 3, 4, 2)),  # split-K fix-up, tail
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 320, 64, 3,
     (32, 128, 1, 4, 3, -1, True, False, True, False)),  # per-step reduction, 3 rows
    ("nvfp4", {}, 256, 32, 2, None),
    ("mxfp4", {}, 256, 24, 2, (16, 64, 2, 4, 2)),
    ("fp8", {}, 256, 160, 1, None),  # the FP8 GEMV (gemv_fp8), tail
    ("int8", {"group_size": 32}, 128, 48, 2, None),  # the tile GEMV (_gemv_kernel)
]
EPS = 1e-6
SCALE = 1.5


def _kernel_cases() -> dict:
    from orbit.kernels import gemv
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.norm_epilogue import NormEpilogue
    from orbit.kernels.random_weights import gemv_operands, random_qweight
    from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton

    out: dict = {}
    for i, (fmt, kw, k, n, m, c) in enumerate(CASES):
        g = torch.Generator().manual_seed(60 + i)
        ops = gemv_operands(random_qweight(fmt, n, k, seed=70 + i, **kw))
        cfg = gemv.GemvConfig(*c) if c else None
        x = torch.randn(m, k, generator=g).bfloat16()
        res = (torch.randn(m, n, generator=g) * 4).bfloat16()
        w = (1 + 0.3 * torch.randn(n, generator=g)).bfloat16()
        a = ((torch.randn(8, k, generator=g) * 0.2).bfloat16(),)
        b = ((torch.randn(n, 8, generator=g) * 0.5).bfloat16(),)
        args = (x, *ops)
        for name, lora in (("plain", None), ("lora", LoRAEpilogue(x @ a[0].T, b, SCALE))):
            nan = torch.full((m, n), float("nan")).bfloat16()
            y = gemv.gemv(*args, nan.clone(), cfg, lora=lora)
            want_s, want_out = add_rmsnorm_triton(res, y, w, EPS)
            norm = NormEpilogue(res, w, EPS, nan.clone(), nan.clone())
            y2 = gemv.gemv(*args, nan.clone(), cfg, lora=lora, norm=norm)
            out[f"{i}-{name}"] = {
                "nan": bool(norm.s.isnan().any() or norm.out.isnan().any()),
                "y": torch.equal(y2, y), "s": torch.equal(norm.s, want_s),
                "out": torch.equal(norm.out, want_out)}
    return out


def _logits(model, ids: torch.Tensor, pos: torch.Tensor, fold: bool) -> torch.Tensor:
    from orbit.models.attention import AttnBatch

    attn = AttnBatch.packed(torch.tensor([0, ids.numel()]))
    attn.fold_norm = fold
    with torch.inference_mode():
        return model.logits(model(ids, pos, attn))


def _model_checks() -> dict:
    """A tiny INT4 Qwen3, batch-1 forwards in inference mode with the fold on and off."""
    from tiny_qwen3 import tiny_qwen3

    import orbit.kernels.dispatch as dmod
    import orbit.models.transformer as tmod
    from orbit.quant.convert import convert_linears
    from orbit.quant.siblings import fuse_siblings

    real_on_gpu, real_fold = dmod._on_gpu, dmod.qmm_add_norm
    # every quantized matmul and norm through the Triton kernels (as on CUDA): the model's
    # no-autograd path (DecoderLayer.forward_fused) then runs
    dmod._on_gpu = lambda x: x.dtype in (torch.bfloat16, torch.float16)
    tmod.fused_rmsnorm_available = lambda x: True
    calls: list[int] = []
    dmod.qmm_add_norm = lambda *a, **kw: calls.append(a[0].shape[0]) or real_fold(*a, **kw)
    model = tiny_qwen3(seed=9).to(torch.bfloat16)
    convert_linears(model, "int4", group_size=32, cache_dequantized=False)
    fuse_siblings(model)
    ids, pos = torch.tensor([17]), torch.tensor([0])
    folded = _logits(model, ids, pos, True)
    n = len(calls)
    separate = _logits(model, ids, pos, False)
    dmod._on_gpu, dmod.qmm_add_norm = real_on_gpu, real_fold
    return {"calls": n, "after_off": len(calls), "equal": torch.equal(folded, separate)}


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("name", ["plain", "lora"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemv_folds_add_rmsnorm(interp: dict, case: int, name: str) -> None:
    r = interp[f"{case}-{name}"]
    assert not r["nan"], r  # every element of s and of the normed rows written
    assert r["y"], r  # the GEMV's own output unchanged
    assert r["s"] and r["out"], r  # the separate launch's row code: the same bits


def test_model_folds_every_o_and_down_proj(interp: dict) -> None:
    r = interp["model"]
    assert r["calls"] == 4, r  # o_proj and down_proj of each of the 2 layers
    assert r["after_off"] == 4, r  # fold_norm=False: no folded launch
    assert r["equal"], r


def test_launch_refuses_norm_outside_the_decode_gemv() -> None:
    from orbit.kernels._qgemm import launch
    from orbit.kernels.norm_epilogue import NormEpilogue
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 64, 64, seed=1, group_size=32)
    t = qw.tensors
    norm = NormEpilogue.make(torch.zeros(1, 64, dtype=torch.bfloat16),
                             torch.ones(64, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="decode GEMV"):
        launch(torch.zeros(1, 64, dtype=torch.bfloat16), "int4", qw.shape, t["qweight"],
               t["scale"], None, None, 32, False, True, norm=norm)  # exact mode


def test_norm_epilogue_checks_shapes() -> None:
    from orbit.kernels.norm_epilogue import NormEpilogue

    y = torch.zeros(2, 8, dtype=torch.bfloat16)
    bad = NormEpilogue.make(torch.zeros(2, 6, dtype=torch.bfloat16),
                            torch.ones(6, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        bad.check(y)


if __name__ == "__main__":
    print_kernel_and_model_results(_kernel_cases, _model_checks)
