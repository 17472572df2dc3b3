"""Which exact-mode tile configs give bit-identical rows, and what each costs at decode sizes.

Exact mode (issue 9) needs row i of `x @ W^T` to be the same bits whatever M is. The kernels
fix the K order (BLOCK_K steps from 0 up, one fp32 accumulator, no split-K); whether the
*tile shape* (BM x BN, warps) may also change without changing the bits depends on how the
compiler lowers `tl.dot` (wgmma for BM >= 64, mma.sync below), which only a GPU can answer.
This script answers it for the shapes Orbit runs, on fresh random inputs:

- reference: rows computed with the training config (the current exact config) at M = 512;
- candidate: every (BM, BN, warps) at the same BLOCK_K, at M in {1, 7, 32, 64, 512};
- `identical` = every candidate row equals the reference row bit for bit;
- time of each candidate at M = 32 and M = 1 (CUDA-graph replay over weight copies beyond L2),
  against the training config at the same M and fast mode (cuBLAS / the fast fused kernel).

    python scripts/bench/exact_tiles.py [--fmts bf16,int4] [--quick] [--decode]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qmm import copies_for, ms_rotated

from orbit.kernels import _qgemm
from orbit.kernels.matmul_exact import BLOCK_K, NUM_STAGES, matmul_exact_triton
from orbit.kernels.random_weights import random_qweight

# Qwen3-1.7B linears (in, out); lm_head only for bf16
SHAPES = [(2048, 2048), (2048, 1024), (2048, 6144), (6144, 2048)]
LM_HEAD = (2048, 151936)
CHECK_M = (1, 7, 32, 64, 512)


def candidates(quick: bool, decode: bool) -> list[tuple[int, int, int, int]]:
    """(BM, BN, warps, stages). `decode`: narrow tiles around the shipped 64x32 decode tile
    (more programs along out, deeper pipelines) instead of the BM x BN grid."""
    if decode:
        return [(64, 32, 4, 3), (64, 16, 4, 3), (64, 16, 4, 4), (64, 16, 4, 6), (64, 32, 4, 4),
                (64, 32, 4, 6), (64, 64, 4, 4), (64, 16, 8, 4)]
    bms = (16, 32, 64, 128)
    bns = (32, 64, 128)
    warps = (4,) if quick else (4, 8)
    return [(bm, bn, w, NUM_STAGES) for bm in bms for bn in bns for w in warps]


def run_fn(fmt: str, qw, x: torch.Tensor, cfg: tuple[int, int, int, int] | None):
    """The exact kernel of `fmt` with tile cfg (None = the shipped exact config for M)."""
    if fmt == "bf16":
        w = qw.tensors["weight"]
        conf = None if cfg is None else (cfg[0], cfg[1], BLOCK_K, cfg[2], cfg[3])
        return lambda: matmul_exact_triton(x, w, None, config=conf)
    t = qw.tensors
    base = _qgemm.EXACT_CONFIG
    conf = None if cfg is None else _qgemm.TileConfig(bm=cfg[0], bo=cfg[1], br=base.br, warps=cfg[2],
                                                      stages=cfg[3])
    return lambda: _qgemm.launch(x, fmt, qw.shape, t["qweight"], t["scale"], t.get("offset"), None,
                                 qw.group_size, False, True, None, conf)


def fast_fn(fmt: str, qw, x: torch.Tensor):
    if fmt == "bf16":
        w = qw.tensors["weight"]
        return lambda: x @ w.T
    from orbit.kernels.dispatch import qmm

    return lambda: qmm(x, qw, exact=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmts", default="bf16,int4")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--decode", action="store_true", help="narrow decode tiles, deeper pipelines")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = []
    for fmt in args.fmts.split(","):
        shapes = SHAPES + ([LM_HEAD] if fmt == "bf16" else [])
        for k, n in shapes:
            qw = random_qweight(fmt, n, k, group_size=128, device=dev)
            x = (torch.randn(512, k, device=dev) * 0.5).to(torch.bfloat16)
            ref = run_fn(fmt, qw, x, None)()
            copies = [random_qweight(fmt, n, k, group_size=128, seed=s + 1, device=dev)
                      for s in range(min(copies_for(n * k // (1 if fmt == "bf16" else 4)), 64))]
            base_t = {m: ms_rotated([run_fn(fmt, c, x[:m], None) for c in copies]) for m in (1, 32)}
            fast_t = {m: ms_rotated([fast_fn(fmt, c, x[:m]) for c in copies]) for m in (1, 32)}
            for cfg in candidates(args.quick, args.decode):
                try:
                    same = all(torch.equal(run_fn(fmt, qw, x[:m], cfg)(), ref[:m]) for m in CHECK_M)
                    t = {m: ms_rotated([run_fn(fmt, c, x[:m], cfg) for c in copies]) for m in (1, 32)}
                except Exception as e:  # noqa: BLE001 (a config the compiler rejects is a result)
                    row = {"fmt": fmt, "k": k, "n": n, "cfg": cfg, "error": f"{type(e).__name__}: {e}"[:200]}
                else:
                    row = {"fmt": fmt, "k": k, "n": n, "cfg": cfg, "identical": same,
                           "us_m1": 1e3 * t[1], "us_m32": 1e3 * t[32],
                           "base_us_m1": 1e3 * base_t[1], "base_us_m32": 1e3 * base_t[32],
                           "fast_us_m1": 1e3 * fast_t[1], "fast_us_m32": 1e3 * fast_t[32]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\nsummary: fmt shape | best identical cfg at M=32 (us) | shipped exact (us) | fast (us)")
    for fmt in args.fmts.split(","):
        for k, n in SHAPES + ([LM_HEAD] if fmt == "bf16" else []):
            ok = [r for r in rows if r["fmt"] == fmt and r["k"] == k and r["n"] == n and r.get("identical")]
            if not ok:
                print(f"{fmt} {k}x{n} | none identical")
                continue
            b = min(ok, key=lambda r: r["us_m32"])
            b1 = min(ok, key=lambda r: r["us_m1"])
            print(f"{fmt} {k}x{n} | M=32 {b['cfg']} {b['us_m32']:.1f} | M=1 {b1['cfg']} {b1['us_m1']:.1f} "
                  f"| exact {b['base_us_m32']:.1f} / {b['base_us_m1']:.1f} | fast {b['fast_us_m32']:.1f} / "
                  f"{b['fast_us_m1']:.1f}")
    bad = [r for r in rows if r.get("identical") is False]
    print(f"\n{len(bad)} of {len(rows)} configs NOT bit-identical:",
          sorted({(r['fmt'], r['cfg']) for r in bad}))


if __name__ == "__main__":
    main()
