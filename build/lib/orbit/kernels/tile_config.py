"""The `tl.dot` loop's tile config (orbit/kernels/_qgemm.py), in its own module so the routing
table (orbit/kernels/qmm_routes.py) can name configs without importing the kernels."""

from __future__ import annotations

from dataclasses import dataclass

# TileConfig.unpack value that selects the INT4 K steps over nibble-plane pairs
# (orbit/kernels/plane_dot.py)
UNPACK_PLANE_PAIRS = 3
PLANE_PAIR_FORMATS = ("int4", "nvfp4", "mxfp4")


@dataclass(frozen=True)
class TileConfig:
    """bm rows of x, bo output columns, br reduction depth per step."""

    bm: int
    bo: int
    br: int
    warps: int
    stages: int
    group_m: int = 8
    # see orbit/kernels/_tiles.py; -1: the format's default (_qgemm.DEFAULT_UNPACK);
    # UNPACK_PLANE_PAIRS: int4 / nvfp4 / mxfp4 fast forward only (pairs_problem)
    unpack: int = -1
    swap: bool = False  # fast forward only: y^T = W @ x^T (see _qgemm_kernel); from route tables
    split: int = 1  # fast forward only: K-slices per output tile, added by the last to arrive
    # registers per thread the compiler may use (Triton's maxnreg; 0: its own choice). For the
    # register-fed tiles, which Nsight Compute found latency-bound at 3 programs per SM by
    # registers (docs/kernels.md, session 15): fewer registers, more resident programs.
    maxnreg: int = 0

    def pairs_problem(self, fmt: str) -> str | None:
        """Why this tile cannot run `fmt` over nibble-plane pairs (None: it can, or it does not
        ask to): they need int4 words or fp4 bytes and whole 64-column K steps. The one rule
        that route tables (when read) and `_qgemm.launch` (when run) both apply."""
        if self.unpack != UNPACK_PLANE_PAIRS or (fmt in PLANE_PAIR_FORMATS and self.br % 64 == 0):
            return None
        return (f"unpack={UNPACK_PLANE_PAIRS} (nibble-plane pairs) runs int4, nvfp4 and mxfp4 tiles "
                f"with br a multiple of 64; got {fmt} with br={self.br}")
