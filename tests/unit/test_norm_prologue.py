"""CPU checks of the residual add + RMSNorm folded into the decode GEMV that reads the normed
row (orbit/kernels/norm_prologue.py) under Triton's interpreter: on fresh random inputs into
NaN-poisoned outputs, for the nibble-plane formats (deferred and per-step, with and without
split-K and x prefetch, tail tiles, 1-3 rows, the stacked gate/up weight with SwiGLU), the
launch's (s, y) equal the separate add_rmsnorm launch followed by the GEMV of its output, bit
for bit; a tiny INT4 model in inference mode with Engine(fold_norm="prologue")'s batch takes
the prologue for the q/k/v and gate/up GEMVs of every layer after the first, with the logits
of the separate launches; and the launch refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch
from triton_interp import print_kernel_and_model_results, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, K, N, M, GemvConfig args or None, swiglu)
CASES = [
    ("int4", {"group_size": 32}, 256, 48, 1, None, False),  # deferred planes, tail tile
    ("int4", {"group_size": 32}, 256, 40, 1, (32, 64, 3, 4, 2), False),  # split-K fix-up
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 320, 64, 3,
     (32, 128, 1, 4, 3, -1, True, False, True, False), False),  # per-step reduction, 3 rows
    ("int4", {"group_size": 32}, 512, 64, 1, None, True),  # gate/up + SwiGLU
    ("nvfp4", {}, 256, 32, 2, None, False),
    ("mxfp4", {}, 256, 48, 1, (16, 64, 2, 4, 2), True),  # SwiGLU with split-K
]
EPS = 1e-6


def _kernel_cases() -> dict:
    from orbit.kernels import gemv
    from orbit.kernels.norm_prologue import NormPrologue
    from orbit.kernels.random_weights import gemv_operands, random_qweight
    from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton

    out: dict = {}
    for i, (fmt, kw, k, n, m, c, swiglu) in enumerate(CASES):
        g = torch.Generator().manual_seed(160 + i)
        ops = gemv_operands(random_qweight(fmt, n, k, seed=170 + i, **kw))
        cfg = gemv.GemvConfig(*c) if c else None
        delta = torch.randn(m, k, generator=g).bfloat16()
        res = (torch.randn(m, k, generator=g) * 4).bfloat16()
        w = (1 + 0.3 * torch.randn(k, generator=g)).bfloat16()
        want_s, x = add_rmsnorm_triton(res, delta, w, EPS)
        n_out = n // 2 if swiglu else n
        nan = torch.full((m, n_out), float("nan")).bfloat16()
        y = gemv.gemv(x, *ops, nan.clone(), cfg, swiglu=swiglu)
        pre = NormPrologue(res, w, EPS, torch.full((m, k), float("nan")).bfloat16())
        y2 = gemv.gemv(delta, *ops, nan.clone(), cfg, swiglu=swiglu, norm=pre)
        out[str(i)] = {"nan": bool(pre.s.isnan().any() or y2.isnan().any()),
                       "y": torch.equal(y2, y), "s": torch.equal(pre.s, want_s)}
    return out


def _logits(model, ids: torch.Tensor, pos: torch.Tensor, fold: bool | str) -> torch.Tensor:
    from orbit.models.attention import AttnBatch

    attn = AttnBatch.packed(torch.tensor([0, ids.numel()]))
    attn.fold_norm = fold
    with torch.inference_mode():
        return model.logits(model(ids, pos, attn))


def _model_checks() -> dict:
    """A tiny INT4 Qwen3 (2 layers), batch-1 forwards in inference mode with the prologue fold
    on and off."""
    from tiny_qwen3 import tiny_qwen3

    import orbit.kernels.dispatch as dmod
    import orbit.models.transformer as tmod
    from orbit.quant.convert import convert_linears
    from orbit.quant.siblings import fuse_siblings

    real_on_gpu, real_fold = dmod._on_gpu, dmod.qmm_prenorm
    # every quantized matmul and norm through the Triton kernels (as on CUDA): the model's
    # no-autograd path (DecoderLayer.forward_fused) then runs
    dmod._on_gpu = lambda x: x.dtype in (torch.bfloat16, torch.float16)
    tmod.fused_rmsnorm_available = lambda x: True
    calls: list[bool] = []
    dmod.qmm_prenorm = lambda *a, **kw: calls.append(kw.get("swiglu", False)) or real_fold(*a, **kw)
    model = tiny_qwen3(seed=19).to(torch.bfloat16)
    convert_linears(model, "int4", group_size=32, cache_dequantized=False)
    fuse_siblings(model)
    ids, pos = torch.tensor([23]), torch.tensor([0])
    folded = _logits(model, ids, pos, "prologue")
    n, kinds = len(calls), sorted(calls)
    separate = _logits(model, ids, pos, False)
    epilogue = _logits(model, ids, pos, True)
    dmod._on_gpu, dmod.qmm_prenorm = real_on_gpu, real_fold
    return {"calls": n, "swiglu_calls": sum(kinds), "after_off": len(calls),
            "equal": torch.equal(folded, separate), "equal_epilogue": torch.equal(folded, epilogue)}


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemv_folds_add_rmsnorm_of_its_input(interp: dict, case: int) -> None:
    r = interp[str(case)]
    assert not r["nan"], r  # every element of s and y written
    assert r["y"], r  # the GEMV of the separately normed row: the same bits
    assert r["s"], r  # s as the separate launch stores it


def test_model_takes_the_prologue_for_qkv_and_gate_up(interp: dict) -> None:
    r = interp["model"]
    # layer 1: the q/k/v GEMV (the add after layer 0's down_proj) and the gate/up GEMV (the
    # add after o_proj); layer 0's q/k/v reads the embedding's norm, and its gate/up folds the
    # add after its o_proj: 2 + 1 = 3, of which 2 gate/up (SwiGLU)
    assert r["calls"] == 3, r
    assert r["swiglu_calls"] == 2, r
    assert r["after_off"] == 3, r  # fold_norm False / True: no prologue launch
    assert r["equal"] and r["equal_epilogue"], r


def test_launch_refuses_a_prologue_outside_the_plane_gemv() -> None:
    from orbit.kernels._qgemm import launch
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.norm_prologue import NormPrologue
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 64, 64, seed=1, group_size=32)
    t = qw.tensors
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    pre = NormPrologue.make(torch.zeros(1, 64, dtype=torch.bfloat16),
                            torch.ones(64, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="norm prologue"):
        launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32, False, True,
               norm=pre)  # exact mode
    lora = LoRAEpilogue(torch.zeros(1, 8, dtype=torch.bfloat16),
                        (torch.zeros(64, 8, dtype=torch.bfloat16),), 1.0)
    with pytest.raises(ValueError, match="norm prologue"):
        launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32, False, False,
               lora=lora, norm=pre)


def test_norm_prologue_checks_shapes_and_aliasing() -> None:
    from orbit.kernels.norm_prologue import NormPrologue

    delta = torch.zeros(2, 8, dtype=torch.bfloat16)
    bad = NormPrologue.make(torch.zeros(2, 6, dtype=torch.bfloat16),
                            torch.ones(6, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="residual must be contiguous"):
        bad.check(delta)
    res = torch.zeros(2, 8, dtype=torch.bfloat16)
    alias = NormPrologue(res, torch.ones(8, dtype=torch.bfloat16), EPS, res)
    with pytest.raises(ValueError, match="must not alias"):
        alias.check(delta)
    f32 = NormPrologue.make(res, torch.ones(8), EPS)
    with pytest.raises(ValueError, match="weight must be"):
        f32.check(delta)


if __name__ == "__main__":
    print_kernel_and_model_results(_kernel_cases, _model_checks)


def test_engine_folds_only_the_measured_formats(monkeypatch: pytest.MonkeyPatch) -> None:
    """dispatch.prenorm_foldable (what the decoder asks before handing a GEMV the add + norm)
    holds for the formats in norm_prologue.PROLOGUE_FORMATS only, wherever the kernel itself
    could run the prologue (INT4 by default: NVFP4 measured slower with it)."""
    import orbit.kernels._qgemm as qmod
    import orbit.kernels.dispatch as dmod
    from orbit.kernels import norm_prologue
    from orbit.kernels.random_weights import random_qweight

    monkeypatch.setattr(dmod, "_fused_store_input", lambda x: True)
    monkeypatch.setattr(qmod, "prenorm_fits", lambda *a: True)  # the kernel could run it
    delta = torch.zeros(1, 64, dtype=torch.bfloat16)
    int4 = random_qweight("int4", 64, 64, seed=1, group_size=32)
    nvfp4 = random_qweight("nvfp4", 64, 64, seed=2)
    assert norm_prologue.PROLOGUE_FORMATS == ("int4",)
    assert dmod.prenorm_foldable(delta, int4) and not dmod.prenorm_foldable(delta, nvfp4)
    monkeypatch.setattr(norm_prologue, "PROLOGUE_FORMATS", ("int4", "nvfp4"))
    assert dmod.prenorm_foldable(delta, nvfp4)
