"""bench_pdl_floor.py's stream kernel (the floor benchmark's launch) against its plain-PyTorch
reference under Triton's interpreter, on fresh random words: slices that split unevenly over
the programs, a program past the end, and no bytes at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from triton_interp import run_in_interpreter

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def _cases() -> list[bool]:
    import torch

    sys.path.insert(0, str(BENCH))
    import bench_pdl_floor as b

    out = []
    for seed, (n, grid) in enumerate([(5000, 7), (3000, 2), (2047, 3), (0, 3), (1500, 4)]):
        g = torch.Generator().manual_seed(seed)
        w = torch.randint(-2**31, 2**31 - 1, (n,), generator=g, dtype=torch.int32)
        w = w ^ torch.randint(0, 2, (n,), generator=g, dtype=torch.int32)  # random parities
        chain = torch.randint(0, 100, (grid,), generator=g, dtype=torch.int32)
        got = chain.clone()
        b.stream(w, got, grid, False)
        out.append(bool(torch.equal(got, b.reference(w, chain, grid))))
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(_cases()))


def test_stream_kernel_matches_reference() -> None:
    assert run_in_interpreter(__file__) == [True] * 5
