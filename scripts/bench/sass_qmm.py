"""Offline sm_90 SASS of the 4-bit `tl.dot` steps, no GPU needed: INT4's join-tree loop
(`int4_tile`, unpack 2) and NVFP4's loop (`nvfp4_tile`, unpack 0) against the nibble-plane pairs
(`plane_dot.plane_pair_step`, plain and inline-asm decode), compiled by Triton + ptxas for a Hopper target on any machine, then
disassembled with the cuobjdump that ships with Triton. Prints the instruction count and the
most frequent opcodes of each, so a kernel change can be read in SASS when no device is lent
(docs/kernels.md quotes its numbers; they are static counts, not timings).

    python scripts/bench/sass_qmm.py [--bm 16 --bo 64 --br 128 --warps 4 --stages 4]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from orbit.kernels.fp4 import nvfp4_tile
from orbit.kernels.int4 import int4_tile
from orbit.kernels.plane_dot import plane_pair_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sm90_compile import SASS_OP, disassemble


@triton.jit
def _pairs(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_q, stride_s,
           BM: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
           ASM: tl.constexpr, FMT: tl.constexpr, SWAP: tl.constexpr):
    """K steps over nibble-plane pairs (FMT 0 int4 g128, 3 nvfp4); SWAP: y^T = W @ x^T."""
    GRP: tl.constexpr = 128 if FMT == 0 else 16
    offs_m = tl.arange(0, BM)
    offs_o = tl.program_id(0) * BO + tl.arange(0, BO)
    if SWAP:
        acc = tl.zeros((BO, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BO), dtype=tl.float32)
    for r0 in tl.range(0, K, BR, num_stages=STAGES):
        acc = plane_pair_step(acc, x_ptr, stride_xm, q_ptr, s_ptr, s_ptr, stride_q, stride_s,
                              offs_m, offs_o, M, N, K, r0, GRP, False, BR, ASM, FMT, SWAP)
    if SWAP:
        tl.store(y_ptr + offs_m[None, :] * N + offs_o[:, None], acc.to(tl.bfloat16))
    else:
        tl.store(y_ptr + offs_m[:, None] * N + offs_o[None, :], acc.to(tl.bfloat16))


@triton.jit
def _loop(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_q, stride_s,
          BM: tl.constexpr, BO: tl.constexpr, BR: tl.constexpr, STAGES: tl.constexpr,
          ASM: tl.constexpr, FMT: tl.constexpr, SWAP: tl.constexpr):
    """The usual loop: the [BO, BR] weight tile (int4 join tree, nvfp4 3-D shift), one dot."""
    offs_m = tl.arange(0, BM)
    o0 = tl.program_id(0) * BO
    offs_o = o0 + tl.arange(0, BO)
    offs_r = tl.arange(0, BR)
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for r0 in tl.range(0, K, BR, num_stages=STAGES):
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + r0 + offs_r[None, :],
                     mask=offs_m[:, None] < M, other=0.0)
        if FMT == 0:
            w = int4_tile(q_ptr, s_ptr, s_ptr, stride_q, stride_s, o0, r0, N, K, 128, False,
                          BO, BR, 2)
        else:
            w = nvfp4_tile(q_ptr, s_ptr, s_ptr, stride_q, stride_s, o0, r0, N, K, BO, BR, 0)
        acc = tl.dot(xt, tl.trans(w.to(tl.bfloat16)), acc)
    tl.store(y_ptr + offs_m[:, None] * N + offs_o[None, :], acc.to(tl.bfloat16))


SIG = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32",
       "N": "i32", "K": "i32", "stride_xm": "i32", "stride_q": "i32", "stride_s": "i32",
       "BM": "constexpr", "BO": "constexpr", "BR": "constexpr", "STAGES": "constexpr",
       "ASM": "constexpr", "FMT": "constexpr", "SWAP": "constexpr"}

# name -> (kernel, fixed constexprs); NVFP4 scales are e4m3 and its usual loop reads bytes
KERNELS = {"int4_loop": (_loop, {"FMT": 0, "SWAP": False}),
           "int4_pairs": (_pairs, {"FMT": 0, "SWAP": False}),
           "nvfp4_loop": (_loop, {"FMT": 3, "SWAP": False}),
           "nvfp4_pairs": (_pairs, {"FMT": 3, "SWAP": False}),
           "nvfp4_swapped": (_pairs, {"FMT": 3, "SWAP": True})}


def _compile(name: str, consts: dict, warps: int):
    fn, fixed = KERNELS[name]
    sig = dict(SIG)
    if fixed["FMT"] == 3:
        sig["s_ptr"] = "*fp8e4nv"
        if fn is _loop:
            sig["q_ptr"] = "*u8"
    src = ASTSource(fn=fn, signature=sig, constexprs={**consts, **fixed})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def smem_allocs(ttgir: str, bm: int, br: int) -> tuple[list[str], list[str]]:
    """(every `local_alloc` shape of a compiled kernel's TTGIR, those that are not a pair step's
    x operand of bm x br/4, i.e. hold weight data, raw or decoded)."""
    allocs = re.findall(r"ttg\.local_alloc[^\n]*?(?:tensor|memdesc)<([0-9x]+)x[a-z]", ttgir)
    x_tiles = {f"{bm}x{br // 4}", f"{br // 4}x{bm}"}
    return allocs, [d for d in allocs if d not in x_tiles]


def weight_tiles_in_smem(name: str, consts: dict, warps: int) -> int:
    """How many shared-memory buffers of the compiled kernel hold weight data: 0 means the
    weights reach the MMAs from registers only."""
    ttgir = _compile(name, consts, warps).asm["ttgir"]
    return len(smem_allocs(ttgir, consts["BM"], consts["BR"])[1])


def sass_histogram(name: str, consts: dict, warps: int) -> tuple[int, list[tuple[str, int]]]:
    """(instruction count, opcodes by frequency) of KERNELS[name] compiled for sm_90."""
    ops = [op for _, op in SASS_OP.findall(disassemble(_compile(name, consts, warps).asm["cubin"]))]
    return len(ops), collections.Counter(ops).most_common()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bm", type=int, default=16)
    ap.add_argument("--bo", type=int, default=64)
    ap.add_argument("--br", type=int, default=128)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    base = {"BM": args.bm, "BO": args.bo, "BR": args.br, "STAGES": args.stages}
    for label, name, asm in [("int4 join-tree loop", "int4_loop", False),
                             ("int4 plane pairs, plain decode", "int4_pairs", False),
                             ("int4 plane pairs, bf16x2 asm", "int4_pairs", True),
                             ("nvfp4 loop (nvfp4_tile)", "nvfp4_loop", False),
                             ("nvfp4 plane pairs, plain decode", "nvfp4_pairs", False),
                             ("nvfp4 plane pairs, bf16x2 asm", "nvfp4_pairs", True),
                             ("nvfp4 pairs swapped, asm", "nvfp4_swapped", True)]:
        n, ops = sass_histogram(name, {**base, "ASM": asm}, args.warps)
        print(f"{label:<32} {n:5d} instructions: "
              + " ".join(f"{op} {k}" for op, k in ops[:args.top]))
    for stages in (1, args.stages):
        c = {**base, "STAGES": stages, "ASM": True}
        print(f"weight tiles in shared memory, {stages} stage(s): nvfp4 pairs "
              f"{weight_tiles_in_smem('nvfp4_pairs', c, args.warps)}, swapped "
              f"{weight_tiles_in_smem('nvfp4_swapped', c, args.warps)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
