"""The one-launch KV-cache write (orbit/kernels/kv_write.py) against torch indexing, in Triton's
interpreter: fresh random keys/values, poisoned caches (every cell the reference leaves alone
must stay poisoned, every written one must match), prefill-style and decode-style indices, a
non-contiguous (column-slice) value tensor as the sibling-grouped projections produce, and a
dtype cast on store."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")


def _interpreter_main() -> None:
    patch_interpreter(bf16_round=True)
    from orbit.kernels.kv_write import kv_write_reference, launch

    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (S, L, H, D, T, src_dtype, dst_dtype) in {
        "decode": (4, 16, 2, 32, 3, torch.bfloat16, torch.bfloat16),
        "prefill": (3, 20, 3, 16, 11, torch.float32, torch.float32),
        "cast": (2, 8, 2, 16, 5, torch.float32, torch.bfloat16),
    }.items():
        kc = torch.full((S, L, H, D), float("nan"), dtype=dst_dtype)
        vc = torch.full((S, L, H, D), float("nan"), dtype=dst_dtype)
        cells = torch.randperm(S * L, generator=g)[:T]
        slot, pos = cells // L, cells % L
        k = torch.randn(T, H, D, generator=g).to(src_dtype)
        # v as a column slice of a wider output (row stride > H * D)
        wide = torch.randn(T, 3 * H * D, generator=g).to(src_dtype)
        v = wide[:, H * D:2 * H * D].view(T, H, D)
        rk, rv = kc.clone(), vc.clone()
        kv_write_reference(rk, rv, k, v, slot, pos)
        launch(kc, vc, k, v, slot, pos)
        same = lambda a, b: bool(torch.equal(a.isnan(), b.isnan())  # noqa: E731
                                 and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)))
        out[name] = same(kc, rk) and same(vc, rv)
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", ["decode", "prefill", "cast"])
def test_kv_write_matches_indexing(interp_results: dict, case: str) -> None:
    assert interp_results[case]


def test_cpu_tensors_take_the_reference() -> None:
    from orbit.kernels.kv_write import kv_write, kv_write_available

    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    k, v = torch.ones(1, 1, 8), 2 * torch.ones(1, 1, 8)
    assert not kv_write_available(kc, k, v)
    kv_write(kc, vc, k, v, torch.tensor([1]), torch.tensor([2]))
    assert kc[1, 2].eq(1).all() and vc[1, 2].eq(2).all() and kc.sum() == 8


if __name__ == "__main__":
    _interpreter_main()
