"""The fused norm + RoPE kernel (orbit/kernels/rope.py) against its torch reference, on CPU under
Triton's interpreter: fresh random inputs, with and without the per-head RMSNorm, bf16 and
fp32, outputs poisoned first; rows keep their bits whatever else is in the batch; and the
autograd wrapper's gradients equal the reference's. tests/gpu/test_rope_gpu.py runs the same
checks on CUDA."""

from __future__ import annotations

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")
CASES = [(torch.float32, True, 16), (torch.float32, False, 32), (torch.bfloat16, True, 64),
         (torch.bfloat16, False, 16)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(dtype: torch.dtype, norm: bool, D: int, T: int = 9, H: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, D, generator=g) * 3).to(dtype)
    w = (1 + 0.2 * torch.randn(D, generator=g)).to(dtype) if norm else None
    ang = torch.rand(T, D // 2, generator=g) * 6
    ang = torch.cat([ang, ang], dim=-1)
    return x, w, ang.cos().to(dtype), ang.sin().to(dtype)


def _interpreter_main() -> None:
    import json

    patch_interpreter(bf16_round=True)
    from orbit.kernels import rope

    out = {}
    for i, (dtype, norm, D) in enumerate(CASES):
        x, w, cos, sin = _inputs(dtype, norm, D, seed=i)
        got = rope.norm_rope_triton(x, w, 1e-6, cos, sin)
        ref = rope.norm_rope_reference(x.double(), None if w is None else w.double(), 1e-6,
                                       cos.double(), sin.double())
        part = rope.norm_rope_triton(x[3:5], w, 1e-6, cos[3:5], sin[3:5])
        out[str(i)] = [_rel(got, ref), bool(torch.isfinite(got).all()), str(got.dtype),
                       bool(torch.equal(part, got[3:5]))]
    # the autograd wrapper: its backward is the reference's, for x and for the norm weight
    x, w, cos, sin = _inputs(torch.float32, True, 16, seed=9)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    got = torch.autograd.grad(rope.NormRopeFunction.apply(x, w, 1e-6, cos, sin), (x, w), dy)
    ref = torch.autograd.grad(rope.norm_rope_reference(x, w, 1e-6, cos, sin), (x, w), dy)
    gx = torch.autograd.grad(rope.NormRopeFunction.apply(x, None, 1e-6, cos, sin), x, dy)[0]
    out["grads"] = [bool(torch.equal(a, b)) for a, b in zip(got, ref)] + [
        bool(torch.equal(gx, torch.autograd.grad(rope.norm_rope_reference(x, None, 1e-6, cos, sin), x, dy)[0]))]
    out["fused_write"] = _fused_write_checks(rope)
    print(json.dumps(out))


def _fused_write_checks(rope) -> list[bool]:
    """qk_norm_rope_kv (q/k norm + RoPE and the K/V cache write in one launch) against
    norm_rope_triton for q and k followed by kv_write's kernel: the same bits, every cache
    element of the written (slot, position) rows set and nothing else touched."""
    from orbit.kernels import kv_write

    res = []
    for dtype, norm, D in [(torch.bfloat16, True, 32), (torch.float32, False, 16)]:
        T, H, HKV, S, L = 5, 4, 2, 3, 8
        q, qw, cos, sin = _inputs(dtype, norm, D, T=T, H=H, seed=20)
        k, kw, _, _ = _inputs(dtype, norm, D, T=T, H=HKV, seed=21)
        v = torch.randn(T, HKV, D, generator=torch.Generator().manual_seed(22)).to(dtype)
        slot = torch.tensor([2, 0, 1, 2, 0])
        pos = torch.tensor([0, 5, 7, 1, 6])
        kc = torch.full((S, L, HKV, D), float("nan"), dtype=dtype)
        vc = kc.clone()
        kc2, vc2 = kc.clone(), vc.clone()
        got = rope.qk_norm_rope_kv(q, k, v, qw, kw, 1e-6, cos, sin, kc, vc, slot, pos)
        ref_q = rope.norm_rope_triton(q, qw, 1e-6, cos, sin)
        kv_write.launch(kc2, vc2, rope.norm_rope_triton(k, kw, 1e-6, cos, sin), v, slot, pos)
        same = lambda a, b: bool(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))  # noqa: E731
        written = ~kc[slot, pos].isnan().any()
        res += [bool(torch.equal(got, ref_q)), same(kc, kc2), same(vc, vc2), bool(written),
                int(kc.isnan().sum()) == (S * L - T) * HKV * D,
                rope.qk_norm_rope_kv_available(q, k, v, qw, kw, kc, vc) is False]  # CPU tensors
    return res


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(interp: dict, case: int) -> None:
    err, finite, dtype, rows_same = interp[str(case)]
    dt, _, _ = CASES[case]
    assert finite and dtype == str(dt)
    assert err < (2e-6 if dt == torch.float32 else 1.5e-2), err
    assert rows_same  # a row's bits do not depend on the rows beside it


def test_fused_cache_write_gives_the_separate_launches_bits(interp: dict) -> None:
    assert interp["fused_write"] == [True] * 12


def test_autograd_wrapper_gives_the_reference_gradients(interp: dict) -> None:
    assert interp["grads"] == [True, True, True]


def test_rmsnorm_function_gradients_are_the_formula_gradients() -> None:
    from orbit.kernels.rmsnorm_exact import RMSNormFunction, rmsnorm_torch

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 24, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(24, generator=g)).requires_grad_()
    dy = torch.randn(5, 24, generator=g)
    got = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), (x, w), dy)
    ref = torch.autograd.grad(rmsnorm_torch(x, w, 1e-6), (x, w), dy)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    frozen = w.detach()  # no weight gradient asked for: only dx
    (dx,) = torch.autograd.grad(RMSNormFunction.apply(x, frozen, 1e-6), (x,), dy)
    assert torch.equal(dx, ref[0])


def test_reference_is_the_model_formula() -> None:
    from orbit.kernels.rope import norm_rope_reference
    from orbit.models.transformer import RMSNorm, apply_rope

    x, w, cos, sin = _inputs(torch.float32, True, 16)
    norm = RMSNorm(16, 1e-6)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        assert torch.equal(norm_rope_reference(x, w, 1e-6, cos, sin), apply_rope(norm(x), cos, sin))
        assert torch.equal(norm_rope_reference(x, None, 1e-6, cos, sin), apply_rope(x, cos, sin))


def test_bad_shapes_are_named() -> None:
    from orbit.kernels.rope import norm_rope_reference

    x, w, cos, sin = _inputs(torch.float32, True, 16)
    with pytest.raises(ValueError, match="cos/sin"):
        norm_rope_reference(x, w, 1e-6, cos[:3], sin)
    with pytest.raises(ValueError, match="weight"):
        norm_rope_reference(x, w[:8], 1e-6, cos, sin)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        norm_rope_reference(x[0], w, 1e-6, cos, sin)


if __name__ == "__main__":
    _interpreter_main()
