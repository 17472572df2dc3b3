"""CPU checks of SwiGLU stored by the gate/up decode GEMV itself (orbit/kernels/gemv.py, PAIR:
each tile holds matching gate and up rows) under Triton's interpreter: on fresh random inputs
into poisoned outputs, for the nibble-plane formats, with and without split-K, tail tiles and
a LoRA epilogue (h computed in the launch or given), the output equals the GEMV's [gate, up]
followed by the SwiGLU kernel, bit for bit; and a tiny INT4 model's MLP takes one launch for
gate, up and SwiGLU at decode sizes, with the logits of the separate launches."""

from __future__ import annotations

import pytest
import torch
from triton_interp import print_kernel_and_model_results, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, K, I (gate rows = up rows), M, GemvConfig args or None)
CASES = [
    ("int4", {"group_size": 32}, 256, 48, 1, None),  # deferred planes, a tail tile (48 = 3 x 16)
    ("int4", {"group_size": 32}, 256, 40, 1, (32, 64, 3, 4, 2)),  # split-K fix-up, tail
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 320, 64, 3,
     (32, 128, 1, 4, 3, -1, True, False, True, False)),  # per-step reduction, 3 rows
    ("nvfp4", {}, 256, 32, 1, None),
    ("mxfp4", {}, 256, 24, 2, (16, 64, 2, 4, 2)),
]
SCALE = 1.5


def _epilogue(kind: str | None, x: torch.Tensor, a: tuple, b: tuple):
    """None, a LoRA epilogue that computes h in the launch ("a"), or one given h ("h")."""
    from orbit.kernels.lora_epilogue import LoRAEpilogue

    if kind is None:
        return None
    if kind == "h":  # h given: the shrink's output
        return LoRAEpilogue(torch.cat([x @ ai.T for ai in a], dim=1), b, SCALE)
    h = torch.full((x.shape[0], sum(ai.shape[0] for ai in a)), float("nan")).bfloat16()
    return LoRAEpilogue(h, b, SCALE, a)


def _logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    from orbit.models.attention import AttnBatch

    with torch.inference_mode():
        return model.logits(model(ids, pos, AttnBatch.packed(torch.tensor([0, ids.numel()]))))


def _kernel_cases() -> dict:
    from orbit.kernels import gemv
    from orbit.kernels.random_weights import random_qweight
    from orbit.kernels.swiglu import silu_mul

    out: dict = {}
    for i, (fmt, kw, k, half, m, c) in enumerate(CASES):
        g = torch.Generator().manual_seed(40 + i)
        qw = random_qweight(fmt, 2 * half, k, seed=50 + i, **kw)
        t = qw.tensors
        q, s = t["qweight"], t["scale"]
        gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
        group = {"nvfp4": 16, "mxfp4": 32}.get(fmt, qw.group_size)
        cfg = gemv.GemvConfig(*c) if c else None
        x = torch.randn(m, k, generator=g).bfloat16()
        r = 8
        a = tuple((torch.randn(r, k, generator=g) * 0.2).bfloat16() for _ in range(2))
        b = tuple((torch.randn(half, r, generator=g) * 0.5).bfloat16() for _ in range(2))
        args = (x, fmt, qw.shape, q, s, t.get("offset"), gs, group)
        for name, kind in (("plain", None), ("lora", "a"), ("lora-h", "h")):
            full = gemv.gemv(*args, torch.full((m, 2 * half), float("nan")).bfloat16(), cfg,
                             lora=_epilogue(kind, x, a, b))
            want = silu_mul(full[:, :half], full[:, half:])
            got = gemv.gemv(*args, torch.full((m, half), float("nan")).bfloat16(), cfg,
                            lora=_epilogue(kind, x, a, b), swiglu=True)
            out[f"{i}-{name}"] = {"nan": bool(got.isnan().any()), "equal": torch.equal(got, want),
                                  "err": ((got.double() - want.double()).abs().max()
                                          / want.double().abs().max()).item()}
    return out


def _model_checks() -> dict:
    """A tiny INT4 Qwen3 (siblings stacked), batch-1 forwards in inference mode: the MLP's
    gate/up GEMV stores SwiGLU itself, with and without LoRA; the same logits as the separate
    launches (dispatch.qmm_swiglu switched off)."""
    from tiny_qwen3 import tiny_int4_decoder

    import orbit.kernels.dispatch as dmod

    out: dict = {}
    real_on_gpu, real_swiglu = dmod._on_gpu, dmod.qmm_swiglu
    # every quantized matmul through the Triton kernels (as on CUDA)
    dmod._on_gpu = lambda x: x.dtype in (torch.bfloat16, torch.float16)
    calls: list[int] = []
    for adapter in (False, True):
        model = tiny_int4_decoder(adapter)
        ids, pos = torch.tensor([17]), torch.tensor([0])
        dmod.qmm_swiglu = lambda *a, **kw: calls.append(a[0].shape[0]) or real_swiglu(*a, **kw)
        calls.clear()
        fused = _logits(model, ids, pos)
        n = len(calls)
        dmod.qmm_swiglu = lambda *a, **kw: (_ for _ in ()).throw(ValueError("off"))
        dmod.swiglu_foldable, real_foldable = (lambda *a, **kw: False), dmod.swiglu_foldable
        separate = _logits(model, ids, pos)
        dmod.swiglu_foldable = real_foldable
        out["lora" if adapter else "base"] = {"calls": n, "equal": torch.equal(fused, separate)}
    dmod._on_gpu, dmod.qmm_swiglu = real_on_gpu, real_swiglu
    return out


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("name", ["plain", "lora", "lora-h"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gemv_stores_swiglu(interp: dict, case: int, name: str) -> None:
    r = interp[f"{case}-{name}"]
    assert not r["nan"], r  # every output element written
    # the GEMV's own gate/up sums (a tile's rows do not change a row's sum) and the SwiGLU
    # kernel's arithmetic: the same bits
    assert r["equal"], r


def test_model_mlp_takes_one_launch(interp: dict) -> None:
    for key in ("base", "lora"):
        r = interp["model"][key]
        assert r["calls"] == 2, r  # one gate/up + SwiGLU launch per layer (2 layers)
        assert r["equal"], r


def test_launch_refuses_swiglu_outside_the_plane_gemv() -> None:
    from orbit.kernels._qgemm import launch
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 64, 64, seed=1, group_size=32)
    t = qw.tensors
    with pytest.raises(ValueError, match="nibble-plane decode GEMV"):
        launch(torch.zeros(1, 64, dtype=torch.bfloat16), "int4", qw.shape, t["qweight"],
               t["scale"], None, None, 32, False, True, swiglu=True)  # exact mode


if __name__ == "__main__":
    print_kernel_and_model_results(_kernel_cases, _model_checks)
