"""The `tl.dot` loop's tile config (orbit/kernels/_qgemm.py), in its own module so the routing
table (orbit/kernels/qmm_routes.py) can name configs without importing the kernels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """bm rows of x, bo output columns, br reduction depth per step."""

    bm: int
    bo: int
    br: int
    warps: int
    stages: int
    group_m: int = 8
    # see orbit/kernels/_tiles.py; -1: the format's default (_qgemm.DEFAULT_UNPACK); 3: int4
    # fast forward only, K steps over nibble-plane pairs (orbit/kernels/plane_dot.py)
    unpack: int = -1
    swap: bool = False  # fast forward only: y^T = W @ x^T (see _qgemm_kernel); from route tables
    split: int = 1  # fast forward only: K-slices per output tile, added by the last to arrive
