"""scripts/bench/sass_int4_mma.py: the offline sm_90 SASS of the Gluon INT4 mma.sync kernel
(orbit/kernels/int4_mma.py) as `int4_mma` launches it: registers, spills, and its K loop's
instruction budget per weight a thread decodes. No GPU needed (Triton's ptxas).

    python scripts/bench/sass_int4_mma.py --m 4 --shape 4096x12288
    python scripts/bench/sass_int4_mma.py --m 16 --row-tiles 1 --prefetch 1
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_gemv import loop_budget
from sm90_compile import BIN, compile_sm90, disassemble

from orbit.kernels.int4_mma import (
    TMA_SMEM,
    MmaConfig,
    _int4_mma_kernel,
    _vec,
    kernel_constants,
    pick_config,
    step_depth,
)

TYPES = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "gs_ptr": "*fp32",
         "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
SCALE_TYPES = {"nvfp4": "*fp8e4nv", "fp8": "*fp32"}
# the runtime integers a real launch passes as multiples of 16 (so the JIT specializes them)
DIVISIBLE = {"N", "K", "stride_xm", "stride_q", "stride_s", "stride_ym", "K_RUN_W"}


def compile_mma(cfg: MmaConfig, m: int, group: int = 128, even_n: bool = True,
                fmt: str = "int4", k: int = 4096, swiglu: bool = False):
    """_int4_mma_kernel for sm_90 as `int4_mma` launches `cfg` at M = m on K = k (`swiglu`:
    with the SwiGLU store)."""
    vec = _vec(group, fmt)
    consts = dict(kernel_constants(cfg, m, group, fmt, even_n,
                                   32 * cfg.warps if cfg.l2 else 0,
                                   k // cfg.split // step_depth(fmt, group), swiglu),
                  PDL=cfg.pdl)
    # (w_desc: the words' TMA descriptor with MmaConfig.tma, else the word pointer again)
    w_desc = (f"tensordesc<i32[{cfg.block_n}, {4 * vec}],{TMA_SMEM!r}>" if cfg.tma
              else "*i32")
    types = dict(TYPES, s_ptr=SCALE_TYPES.get(fmt, "*bf16"), w_desc=w_desc)
    return compile_sm90(_int4_mma_kernel, consts, types, cfg.num_warps, 1, DIVISIBLE)


def resources(cubin: bytes) -> str:
    """cuobjdump's resource line (REG, STACK, SHARED, LOCAL) of the kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    return [ln.strip() for ln in out.splitlines() if "REG:" in ln][-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x12288", help="in x out (for the shipped config)")
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--fmt", default="int4", choices=("int4", "nvfp4", "fp8"))
    ap.add_argument("--group", type=int, default=None,
                    help="default 128 (int4, fp8), 16 (nvfp4)")
    ap.add_argument("--warps", type=int)
    ap.add_argument("--row-tiles", type=int)
    ap.add_argument("--prefetch", type=int)
    ap.add_argument("--x-prefetch", type=int, choices=(0, 1))
    ap.add_argument("--split", type=int)
    ap.add_argument("--pdl", type=int, choices=(0, 1), help="compile the PDL form")
    ap.add_argument("--stages", type=int, help="cp.async shared-memory ring depth (0: none)")
    ap.add_argument("--tma", type=int, help="TMA shared-memory ring depth (0: none)")
    ap.add_argument("--chains", type=int, choices=(1, 2), help="MMA chains per step (INT4)")
    ap.add_argument("--x-smem", type=int, choices=(0, 1),
                    help="stage the program's x slice in shared memory (MmaConfig.x_smem)")
    ap.add_argument("--kw", type=int, help="warps along K in a program (MmaConfig.kw)")
    ap.add_argument("--swiglu", action="store_true", help="with the SwiGLU store")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)
    k_in, n_out = (int(v) for v in args.shape.split("x"))
    group = args.group or (16 if args.fmt == "nvfp4" else 128)
    # (the split-K pick under any other form's flag: those forms exclude warps along K)
    forms = (args.stages, args.tma, args.chains, args.x_smem, args.split, args.warps)
    cfg = pick_config(args.m, k_in, n_out, group, 132, args.fmt,
                      warp_k=1 if any(v is not None for v in forms) else None)
    cfg = dataclasses.replace(cfg, **{f: v for f, v in (("warps", args.warps),
                                                        ("row_tiles", args.row_tiles),
                                                        ("prefetch", args.prefetch),
                                                        ("x_prefetch", args.x_prefetch),
                                                        ("split", args.split),
                                                        ("stages", args.stages), ("tma", args.tma),
                                                        ("chains", args.chains),
                                                        ("kw", args.kw),
                                                        ("x_smem", None if args.x_smem is None
                                                         else bool(args.x_smem)),
                                                        ("pdl", None if args.pdl is None
                                                         else bool(args.pdl)))
                                if v is not None})
    kernel = compile_mma(cfg, args.m, group, fmt=args.fmt, k=k_in, swiglu=args.swiglu)
    n, ops, total = loop_budget(disassemble(kernel.asm["cubin"]), key="HMMA")
    weights = 16 * cfg.row_tiles * step_depth(args.fmt, group) // 32  # per thread per step
    print(f"{args.fmt} mma M={args.m} {cfg} (triton {triton.__version__}): K loop {n} instructions "
          f"per step ({n / weights:.2f} per weight a thread decodes, {weights} of them), "
          f"kernel {total}; {resources(kernel.asm['cubin'])}")
    print("  " + " ".join(f"{op} {c}" for op, c in ops.most_common(args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
