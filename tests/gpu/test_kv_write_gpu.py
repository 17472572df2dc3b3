"""The one-launch KV-cache write on CUDA against torch indexing (poisoned caches, random cells,
a column-slice value tensor, Qwen3-1.7B's 8 x 128 heads)."""

from __future__ import annotations

import pytest
import torch

from orbit.kernels.kv_write import kv_write, kv_write_available, kv_write_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_kv_write_equals_indexing(T: int) -> None:
    S, L, H, D = 64, 512, 8, 128
    kc = torch.full((S, L, H, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    vc = kc.clone()
    cells = torch.randperm(S * L, device="cuda")[:T]
    slot, pos = cells // L, cells % L
    k = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(T, 3 * H * D, device="cuda", dtype=torch.bfloat16)[:, H * D:2 * H * D].view(T, H, D)
    assert kv_write_available(kc, k, v)
    rk, rv = kc.clone(), vc.clone()
    kv_write_reference(rk, rv, k, v, slot, pos)
    kv_write(kc, vc, k, v, slot, pos)
    for a, b in ((kc, rk), (vc, rv)):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
