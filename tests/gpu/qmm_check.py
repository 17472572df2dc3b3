"""The check the tensor-core decode kernels' GPU tests share (test_int4_mma_gpu.py,
test_int4_wgmma_gpu.py): a kernel's forward on fresh random packed weights and activations,
into a NaN-poisoned output, against x (float64) @ W^T with W the reference dequantization."""

from __future__ import annotations

from collections.abc import Callable

import torch

from orbit.kernels.random_weights import random_qweight

TOL = 1e-2  # as the other decode kernels (bf16 output rounding is ~2e-3 relative)


def check_against_dequant(run: Callable, m: int, k: int, n: int, group: int, cfg, seed: int,
                          fmt: str = "int4") -> None:
    """`run(x, qw, cfg, out=None)` writes every element of `out`, within TOL of the reference,
    and gives the same bits on a second launch (split-K fix-up counters re-armed)."""
    kw = {"group_size": group} if fmt == "int4" else {}
    qw = random_qweight(fmt, n, k, seed=seed, device="cuda", **kw)
    x = torch.randn(m, k, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + 1)
                    ).bfloat16()
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = run(x, qw, cfg, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isfinite(y).all(), "an output element was not written"
    ref = x.double() @ qw.dequantize().double().T
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL, (m, k, n, group, cfg, err)
    again = run(x, qw, cfg)
    assert torch.equal(again, y), "a second launch differs (fix-up counters not re-armed?)"
