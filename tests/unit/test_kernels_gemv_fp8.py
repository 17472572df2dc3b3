"""CPU checks of the FP8 decode GEMV (orbit/kernels/gemv_fp8.py) under Triton's interpreter:
both e4m3 decodes (Triton's convert, integer bits) against float64 on fresh random inputs,
every e4m3 code including the subnormal ones, split-K, masked tails, M up to 4, and the
routing from `gemv.gemv`. The interpreter runs in a subprocess (see test_kernels_gemv.py)."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")
# (out, in, M): 80 rows is no multiple of 32 (masked tail); in = 320 is no multiple of 128
# (a partial scale block and a partial step).
SHAPES = [(80, 320, 1), (256, 512, 1), (160, 384, 3), (128, 1024, 2), (96, 640, 4)]
# (block_n, block_k, split, warps, stages, dec, x_prefetch)
CONFIGS = {"dec0": (32, 256, 1, 4, 3, 0, True), "dec1": (32, 256, 1, 4, 3, 1, True),
           "dec1-split2": (32, 128, 2, 4, 3, 1, False), "dec0-split3": (16, 128, 3, 4, 2, 0, True),
           "dec1-split3-n16": (16, 128, 3, 2, 3, 1, True), "dec1-n64": (64, 128, 1, 4, 3, 1, True)}


def _blocks(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]


def _interpreter_main() -> None:
    patch_interpreter(bf16_round=True)
    from orbit.kernels import gemv
    from orbit.kernels.gemv_fp8 import Fp8GemvConfig, gemv_fp8

    out: dict = {}
    for i, (n, k, m) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(10 + i)
        s = torch.rand(-(-n // 128), -(-k // 128), generator=g) * 0.01 + 1e-3
        w = torch.randn(n, k, generator=g) * 0.05
        q = (w / _blocks(s, n, k)).clamp(-448, 448).to(torch.float8_e4m3fn)
        # every code 0x00..0xFF except the two NaNs, spread over the first rows
        codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
        q.view(torch.uint8).view(-1)[: codes.numel()] = codes
        wd = q.double() * _blocks(s, n, k).double()
        for name, c in CONFIGS.items():
            x = torch.randn(m, k, generator=g).bfloat16()
            y = torch.full((m, n), float("nan"))  # fp32 output: the sums, not the bf16 rounding
            gemv_fp8(x, q, s, y, Fp8GemvConfig(*c))
            ref = x.double() @ wd.T
            out[f"{i}-{name}"] = {"nan": bool(y.isnan().any()),
                                  "err": ((y.double() - ref).abs().max() / ref.abs().max()).item()}
            # w_preload (the first 1-2 steps' weights loaded before the PDL wait, the loop
            # after them): the same sums in the same order, so the same bits
            ys = []
            for wp in (1, 2):
                yp = torch.full((m, n), float("nan"))
                gemv_fp8(x, q, s, yp, Fp8GemvConfig(*c, w_preload=wp))
                ys.append(torch.equal(yp, y))
            out[f"{i}-{name}"]["preload_same_bits"] = ys
    # gemv.gemv sends FP8 at M = 1 here unless a GemvConfig asks for the tile kernel.
    n, k = 64, 256
    s = torch.full((1, 2), 0.01)
    q = torch.randn(n, k).mul(30).clamp(-448, 448).to(torch.float8_e4m3fn)
    x = torch.randn(1, k).bfloat16()
    calls = []
    import orbit.kernels.gemv_fp8 as mod

    real = mod.gemv_fp8
    mod.gemv_fp8 = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    y1 = gemv.gemv(x, "fp8", (n, k), q, s, None, None, 128, torch.empty(1, n).bfloat16())
    y2 = gemv.gemv(x, "fp8", (n, k), q, s, None, None, 128, torch.empty(1, n).bfloat16(),
                   gemv.GemvConfig(32, 128, 1, 4, 3))
    mod.gemv_fp8 = real
    ref = (x.double() @ (q.double() * 0.01).T)
    out["routed"] = {"calls": len(calls),
                     "e_new": ((y1.double() - ref).norm() / ref.norm()).item(),
                     "e_tile": ((y2.double() - ref).norm() / ref.norm()).item()}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_fp8_gemv_matches_float64(interp_results: dict, shape: int, config: str) -> None:
    r = interp_results[f"{shape}-{config}"]
    assert not r["nan"]  # every output element written (the output was poisoned)
    assert r["err"] < 1e-5, r  # fp32 sums of exact products: only summation-order rounding
    assert r["preload_same_bits"] == [True, True], r  # Fp8GemvConfig.w_preload 1 and 2


def test_gemv_routes_fp8_small_m_to_the_fp8_kernel(interp_results: dict) -> None:
    r = interp_results["routed"]
    assert r["calls"] == 1  # the GemvConfig call kept the tile kernel
    assert r["e_new"] < 4e-3 and r["e_tile"] < 4e-3, r  # bf16 output rounding


def test_config_rejects_tiles_across_scale_blocks() -> None:
    from orbit.kernels.gemv_fp8 import Fp8GemvConfig, gemv_fp8

    q = torch.zeros(64, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="block_n must divide 128"):
        gemv_fp8(torch.zeros(1, 256), q, torch.ones(1, 2), torch.empty(1, 64),
                 Fp8GemvConfig(block_n=48))


if __name__ == "__main__":
    _interpreter_main()


def test_m1_unsplit_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """gemv_fp8.FP8_M1_UNSPLIT (off until measured): on, M = 1 shapes whose 32-row tiles
    under-fill the SMs get 16-row unsplit tiles (a divisor of the 128-row scale block); wide
    shapes and M > 1 keep the split rule's configs."""
    from orbit.kernels import gemv_fp8

    shapes = ((2048, 2048), (2048, 6144), (4096, 2048), (12288, 4096))
    off = {(m, n, k): gemv_fp8.pick_fp8_gemv_config(m, n, k, 132) for m in (1, 3)
           for n, k in shapes}
    assert off[(1, 2048, 2048)].split > 1
    monkeypatch.setattr(gemv_fp8, "FP8_M1_UNSPLIT", True)
    for (m, n, k), c in off.items():
        on = gemv_fp8.pick_fp8_gemv_config(m, n, k, 132)
        if m == 1 and n < 2 * 132 * 32:
            assert (on.split, on.block_n) == (1, 16), (n, k, on)
            assert 128 % on.block_n == 0 and (on.block_k % 128 == 0)
        else:
            assert on == c, (m, n, k)
