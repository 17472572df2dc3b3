"""Offline sm_90 compiles of Triton kernels for CPU tests (Triton's own ptxas, no GPU): the
PTX of one specialization, so a test can check where loads sit against the PDL wait or that
a form compiles at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def sm90_ptx(fn, consts: dict, types: dict, warps: int = 4, stages: int = 3) -> str:
    """PTX of jit function `fn` (scripts/bench/sm90_compile.compile_sm90: `consts`, argument
    `types` by name, no divisibility assumed). Skips the test where the installed Triton ships
    no ptxas."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    from sm90_compile import BIN, compile_sm90

    if not (BIN / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    return compile_sm90(fn, consts, types, warps, stages).asm["ptx"]
