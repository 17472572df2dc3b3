"""Offline sm_90 compiles of Triton kernels for CPU tests (Triton's own ptxas, no GPU): the
PTX of one specialization, so a test can check where loads sit against the PDL wait or that
a form compiles at all."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest


def sm90_ptx(fn, consts: dict, types: dict, warps: int = 4, stages: int = 3) -> str:
    """PTX of jit function `fn` with `consts` (its defaulted constexprs filled in) and argument
    types (`types` by name; other `*_ptr` arguments *bf16, the rest i32). Skips the test where
    the installed Triton ships no ptxas."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    consts = dict(consts)
    for n, prm in inspect.signature(fn.fn).parameters.items():  # the defaulted constexprs
        if prm.default is not inspect.Parameter.empty:
            consts.setdefault(n, prm.default)
    sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr")
                                                         else "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    return k.asm["ptx"]
