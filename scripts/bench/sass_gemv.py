"""Offline sm_90 SASS budget of the nibble-plane decode GEMV's K loop, no GPU needed.

Session 20's Nsight Compute profile of the batch-1 INT4 GEMV (docs/rollout.md, "Why a small
GEMV streams slowly") found its time is each warp's instruction chain (one issue per ~4.5
cycles, DRAM at 21%), so the K loop's instruction count per step is the number a kernel
change has to lower. This compiles `_gemv_planes_kernel` for a Hopper target with Triton's
own ptxas, as the JIT would specialize a real launch (16-divisible pointers, strides and
sizes: without that the word loads are not vectorized and the count is wrong), disassembles
it with Triton's cuobjdump, finds the K loop (the backward branch whose body holds the most
FFMAs) and prints its instructions per step, per nibble a thread decodes, and by opcode.
Static counts, not timings; the device runs Triton 3.6, this machine may run another.

    python scripts/bench/sass_gemv.py [--fmt int4] [--shape 2048x4096] [--m 1]
        [--bn BN --bk BK --warps W --stages S]   # (default: pick_gemv_config's, as shipped)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_compile import SASS_OP, compile_sm90, disassemble

from orbit.kernels._qgemm import FMT_IDS
from orbit.kernels.gemv import GemvConfig, _gemv_planes_kernel, pick_gemv_config, plane_code

# what the JIT's specialization gives a real launch: these integer arguments are multiples
# of 16 at the Qwen3 / SmolLM2 shapes, and every pointer is 16-byte aligned
DIVISIBLE = {"N", "K", "K_PER", "stride_xm", "stride_om", "stride_os", "stride_q", "stride_s",
             "stride_ym", "stride_hm"}
TYPES = {"out_ptr": "*fp32", "q_ptr": "*i32", "g_ptr": "*fp32", "cnt_ptr": "*i32",
         "ncnt_ptr": "*i32", "lscale": "fp32", "eps": "fp32"}
GROUPS = {"int4": 128, "nvfp4": 16, "mxfp4": 32}


def compile_planes(fmt: str, cfg: GemvConfig, m: int = 1) -> triton.compiler.CompiledKernel:
    """_gemv_planes_kernel for sm_90 in the form `gemv()` launches for `fmt` and `cfg` at M = m
    (with PDL and the inline-asm decode, as on the device)."""
    fn = _gemv_planes_kernel
    consts = {"FMT": FMT_IDS[fmt], "CODE": plane_code(fmt, False, cfg.e2m1), "GROUP": GROUPS[fmt], "HAS_OFFSET": False,
              "MP": triton.next_power_of_2(m), "BN": cfg.block_n,
              "NG": cfg.block_k // GROUPS[fmt], "STAGES": cfg.stages, "FIXUP": cfg.split > 1,
              "DEFER": cfg.defer, "ASM": True, "XPRE": cfg.x_prefetch, "PDL": 1,
              "L2PRE": cfg.l2_prefetch, "WPRE": cfg.w_preload}
    types = dict(TYPES)
    if fmt != "int4":
        types["s_ptr"] = "*fp8e4nv" if fmt == "nvfp4" else "*u8"
    return compile_sm90(fn, consts, types, cfg.warps, cfg.stages, DIVISIBLE)


def loop_budget(sass: str, key: str = "FFMA") -> tuple[int, collections.Counter, int]:
    """(instructions in the K loop, its opcodes, instructions in the kernel): the K loop is
    the backward branch's body with the most `key` instructions (FFMA; HMMA for MMA loops)."""
    lines = [(int(a, 16), op) for a, op in SASS_OP.findall(sass)]
    best: collections.Counter = collections.Counter()
    for text in sass.splitlines():
        if " BRA 0x" not in text:
            continue
        src = int(text.split("/*", 1)[1].split("*/", 1)[0], 16)
        dst = int(text.split(" BRA ", 1)[1].split()[0].rstrip(";"), 16)
        if dst >= src:
            continue
        body = collections.Counter(op for a, op in lines if dst <= a <= src)
        if body[key] > best[key]:
            best = body
    return sum(best.values()), best, len(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fmt", default="int4", choices=sorted(GROUPS))
    ap.add_argument("--shape", default="2048x4096", help="in x out (for the shipped config)")
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--bn", type=int, help="rows per program (default: the shipped config's)")
    ap.add_argument("--bk", type=int, help="K depth per step")
    ap.add_argument("--warps", type=int)
    ap.add_argument("--stages", type=int)
    ap.add_argument("--defer", choices=("on", "off"), help="the deferred reduction (GemvConfig.defer)")
    ap.add_argument("--xpre", choices=("on", "off"), help="the x prefetch (GemvConfig.x_prefetch)")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)
    k_in, n_out = (int(v) for v in args.shape.split("x"))
    cfg = pick_gemv_config(args.m, n_out, k_in, args.fmt)
    cfg = dataclasses.replace(cfg, **{f: v for f, v in (("block_n", args.bn), ("block_k", args.bk),
                                                        ("warps", args.warps),
                                                        ("stages", args.stages)) if v})
    for field, flag in (("defer", args.defer), ("x_prefetch", args.xpre)):
        if flag:
            cfg = dataclasses.replace(cfg, **{field: flag == "on"})
    n, ops, total = loop_budget(disassemble(compile_planes(args.fmt, cfg, args.m).asm["cubin"]))
    nibbles = cfg.block_n * cfg.block_k // (32 * cfg.warps)  # per thread per step
    print(f"{args.fmt} M={args.m} {cfg.block_n} rows x {cfg.block_k}-deep steps, {cfg.warps} "
          f"warps, {cfg.stages} stages: K loop {n} instructions per step ({n / nibbles:.2f} per "
          f"weight a thread decodes, {nibbles} of them), kernel {total}")
    print("  " + " ".join(f"{op} {c}" for op, c in ops.most_common(args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
