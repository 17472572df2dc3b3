"""What the PDL chain tests of the decode kernels share: a chain of dependent launches gives
the bits of plain launches, eager and replayed from a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_pdl_chain_matches_plain(chain: Callable[[bool], torch.Tensor],
                                   replays: int = 3) -> torch.Tensor:
    """`chain(pdl)` runs the dependent launches (each reading the previous one's output) with
    or without PDL and returns the last output. Asserts the PDL chain equals the plain one
    eagerly and in every replay of a captured graph (its output zeroed before each, so a
    replay that writes nothing fails); returns the plain output."""
    plain = chain(False)
    assert torch.equal(chain(True), plain)
    g = torch.cuda.CUDAGraph()
    chain(True)  # compile outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = chain(True)
    for _ in range(replays):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)
    return plain
