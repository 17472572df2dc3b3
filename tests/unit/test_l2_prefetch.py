"""The experimental weight prefetcher's chunk plan (orbit/rollout/l2_prefetch.py): every byte of
every tensor covered, 16-byte aligned starts and sizes, no piece over the chunk, repeated
ranges (the same tensor twice) planned once. The prefetch itself runs on CUDA only
(tests/gpu/test_l2_prefetch_gpu.py: the same bits with it on)."""

from __future__ import annotations

import torch

from orbit.rollout.l2_prefetch import plan_chunks


def test_plan_covers_every_byte_aligned_and_bounded() -> None:
    buf = torch.zeros(300_001, dtype=torch.int8)
    ts = [buf[3:200_003], buf[200_003:], torch.zeros(77, dtype=torch.bfloat16), buf[3:200_003],
          torch.zeros(0)]
    addrs, sizes = plan_chunks(ts, chunk=1 << 14)
    assert all(a % 16 == 0 for a in addrs) and all(s % 16 == 0 and 0 < s <= 1 << 14 for s in sizes)
    covered = sorted(zip(addrs, sizes))
    for t in ts[:3]:
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        pos = lo
        for a, s in covered:  # walk the pieces in address order
            if a <= pos < a + s:
                pos = a + s
        assert pos >= hi, (lo, hi, pos)
    # the repeated view adds nothing; the empty tensor adds nothing
    once, _ = plan_chunks(ts[:3], chunk=1 << 14)
    assert len(once) == len(addrs)
