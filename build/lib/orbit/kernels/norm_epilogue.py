"""The decoder's residual add + RMSNorm folded into the decode GEMV that produces the delta.

In a fast-mode decode step the o_proj and down_proj GEMVs are each followed by one launch of
`add_rmsnorm_triton`: s = residual + delta, x = rmsnorm(s) * w, which the next GEMV reads.
With a `NormEpilogue` the GEMV does it itself. Each column tile's final writer (the program
itself without split-K, the split-K fix-up's winner with it) stores its part of the delta y,
passes a CTA barrier and bumps one grid-wide arrival counter (acq_rel, the release/acquire
pair of the split-K fix-up); the program that arrives last has every tile's y visible and
runs `rmsnorm_exact.add_rmsnorm_row` on each of the M rows (y read through L2), then re-arms
the counter for the next launch or graph replay. One launch per norm fewer: 56 of a
Qwen3-1.7B decode step's ~273 at batch 1.

Same row code as the separate launch (`add_rmsnorm_row`), so the same arithmetic; the bits are
equal wherever the row reduction gets the same layout, which Triton derives from BLOCK and the
launch's warps: the separate launch uses 4 warps, as the GEMVs do unless their config says
otherwise (interpreter: always equal; tests/unit/test_norm_epilogue.py, and the GPU test).
The cost is a serial tail: one program reads 2 x M rows and writes 2 x M rows after the rest
of the grid is done (~1 us), against a launch's ramp and drain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels._triton import triton


@dataclass(frozen=True)
class NormEpilogue:
    """What the GEMV's last program computes after y [M, N] = delta is complete:
    s = residual + y (stored into `s`), out = rmsnorm(s, eps) * weight (stored into `out`).
    residual, s and out are contiguous [M, N] in y's dtype; weight is [N]."""

    residual: Tensor
    weight: Tensor
    eps: float
    s: Tensor
    out: Tensor

    @staticmethod
    def make(residual: Tensor, weight: Tensor, eps: float) -> NormEpilogue:
        """Fresh outputs shaped like the residual (out in the promoted dtype, as the
        separate launch's)."""
        residual = residual.contiguous()
        return NormEpilogue(residual, weight, eps, torch.empty_like(residual),
                            torch.empty(residual.shape, device=residual.device,
                                        dtype=torch.promote_types(residual.dtype, weight.dtype)))

    def check(self, y: Tensor) -> None:
        m, n = y.shape
        for name, t in (("residual", self.residual), ("s", self.s), ("out", self.out)):
            if t.shape != (m, n) or not t.is_contiguous():
                raise ValueError(f"norm epilogue: {name} must be contiguous [{m}, {n}] like the "
                                 f"GEMV output; got {tuple(t.shape)} strides {t.stride()}")
        if self.residual.dtype != y.dtype or self.s.dtype != y.dtype:
            raise ValueError(f"norm epilogue: residual {self.residual.dtype} and s "
                             f"{self.s.dtype} must be the GEMV output's dtype {y.dtype}")
        if self.weight.shape != (n,):
            raise ValueError(f"norm epilogue: weight must be [{n}], got "
                             f"{tuple(self.weight.shape)}")


def norm_kernel_args(norm: NormEpilogue | None, y: Tensor, tiles: int,
                     counter: Tensor) -> tuple[tuple, dict]:
    """(positional args, constexprs) a GEMV launch passes for `norm` (dummies when None):
    r_ptr, nw_ptr, ns_ptr, nx_ptr, ncnt_ptr, NT (column tiles that arrive), eps; NORM, NB."""
    if norm is None:
        return (y, y, y, y, counter, 1, 0.0), {"NORM": False, "NB": 16}
    norm.check(y)
    return ((norm.residual, norm.weight, norm.s, norm.out, counter, tiles, float(norm.eps)),
            {"NORM": True, "NB": max(16, triton.next_power_of_2(y.shape[1]))})
