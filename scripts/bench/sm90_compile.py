"""Offline sm_90 compiles of Triton kernels with Triton's own ptxas, and their SASS by the
cuobjdump that ships with Triton: no GPU needed. Shared by the SASS budget scripts
(sass_qmm.py, sass_gemv.py) and the CPU tests that read a kernel's PTX (tests/sm90_ptx.py)."""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# one SASS instruction line: its address and opcode (after an optional predicate)
SASS_OP = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", re.MULTILINE)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(fn, consts: dict, types: dict, warps: int = 4, stages: int = 3,
                 divisible: frozenset[str] | set[str] = frozenset()):
    """jit function `fn` compiled for sm_90 with `consts` (its defaulted constexprs filled in)
    and argument types (`types` by name; other `*_ptr` arguments *bf16, the rest i32).
    `divisible`: the integer arguments the JIT would specialize as multiples of 16, as it does
    every pointer here too (without that, loads a real launch vectorizes compile as scalar
    ones); empty: no divisibility assumed."""
    consts = dict(consts)
    for n, prm in inspect.signature(fn.fn).parameters.items():  # the defaulted constexprs
        if prm.default is not inspect.Parameter.empty:
            consts.setdefault(n, prm.default)
    sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr")
                                                         else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if divisible and n not in consts and (n.endswith("_ptr") or n in divisible)}
    source = ASTSource
    if type(fn).__name__ == "GluonJITFunction":  # a Gluon kernel (explicit layouts)
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def disassemble(cubin: bytes) -> str:
    """The SASS text of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
