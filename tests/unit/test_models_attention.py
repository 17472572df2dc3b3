"""AttnBatch / KVCache unit behaviour: validation, slot copies, and decode against a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orbit.models.attention import AttnBatch, KVCache, cu_seqlens_from_lengths


def test_backend_and_shapes_are_validated() -> None:
    cu = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="backend"):
        AttnBatch.packed(cu, backend="flash")
    with pytest.raises(ValueError, match="CUDA"):
        AttnBatch.packed(cu, backend="varlen").attend(0, *(torch.randn(3, 2, 4) for _ in range(3)))
    cache = KVCache(1, 2, 8, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        AttnBatch.cached(cache, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_context"):
        AttnBatch.cached(cache, torch.tensor([0]), torch.tensor([0, 1]), torch.tensor([0]), max_context=9)
    with pytest.raises(ValueError, match="positive"):
        cu_seqlens_from_lengths([2, 0])


def test_copy_slot_and_release() -> None:
    cache = KVCache(2, 3, 6, 2, 4, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    before = cache.k[:, 2, 4:].clone()
    cache.copy_slot(0, 2, 4)
    assert torch.equal(cache.k[:, 2, :4], cache.k[:, 0, :4]) and torch.equal(cache.v[:, 2, :4], cache.v[:, 0, :4])
    assert torch.equal(cache.k[:, 2, 4:], before)  # positions past `length` untouched
    assert cache.nbytes() == 2 * 2 * 3 * 6 * 2 * 4 * 4
    cache.release()
    assert cache.k.numel() == 0 and cache.v.numel() == 0


def test_decode_reads_only_each_slots_prefix() -> None:
    torch.manual_seed(0)
    H, Hkv, D, S, L = 4, 2, 8, 5, 16
    cache = KVCache(1, S, L, Hkv, D, torch.float32)
    cache.k.normal_()
    cache.v.normal_()
    slots, start = torch.tensor([4, 1, 2]), torch.tensor([0, 7, 11])
    q, k, v = torch.randn(3, H, D), torch.randn(3, Hkv, D), torch.randn(3, Hkv, D)
    out = AttnBatch.cached(cache, slots, torch.arange(4), start, max_context=12).attend(0, q, k, v)
    for b in range(3):
        s, p = slots[b].item(), start[b].item()
        assert torch.equal(cache.k[0, s, p], k[b])  # the new key was written at start_pos
        kb = cache.k[0, s, : p + 1].repeat_interleave(H // Hkv, 1).transpose(0, 1)  # [H, p+1, D]
        vb = cache.v[0, s, : p + 1].repeat_interleave(H // Hkv, 1).transpose(0, 1)
        ref = F.softmax((q[b][:, None, :] @ kb.transpose(1, 2)) / D**0.5, -1) @ vb  # [H, 1, D]
        torch.testing.assert_close(out[b], ref[:, 0], rtol=1e-5, atol=1e-5)
