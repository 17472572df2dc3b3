"""GPU checks of the Gluon INT4 wgmma kernel for rollout rows (orbit/kernels/int4_wgmma.py).

Fresh random packed weights (every nibble pattern) and activations for every check, NaN-poisoned
outputs, relative norm against x (float64) @ W^T with W the reference dequantization, the
decode kernels' tolerance. Covers M from 17 to 256 (one and two column tiles, ragged last
tiles), row tails (N not a multiple of 64), one / two / four warpgroups, groups 64 / 128, split-K through the in-kernel
fix-up (a second launch must give the same bits: the counters re-arm), two warpgroups per
program, ring depths 2 and 4, and one-hot rows that must read the dequantized weights
exactly (the kernel scales each weight before the MMA, as the reference does); NVFP4 at the
default config and three others; the fast-mode route through dispatch.qmm when switched on.
Run: `pytest -m gpu tests/gpu/test_int4_wgmma_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from qmm_check import check_against_dequant

from orbit.kernels.random_weights import random_qweight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or torch.cuda.get_device_capability()[0] != 9, reason="needs sm_90"),
]



def _run(x, qw, cfg=None, out=None):
    from orbit.kernels.int4_mma import weight_operands
    from orbit.kernels.int4_wgmma import int4_wgmma

    q, s, group, gs = weight_operands(qw)
    return int4_wgmma(x, q, s, group, cfg, out, qw.fmt, gs)


def _check(m: int, k: int, n: int, group: int, cfg, seed: int, fmt: str = "int4") -> None:
    check_against_dequant(_run, m, k, n, group, cfg, seed, fmt)


@pytest.mark.parametrize("m", [17, 33, 64, 65, 100, 128, 129, 200, 256])
@pytest.mark.parametrize("k,n", [(2048, 6144), (6144, 2048), (2048, 4096), (2048, 200)])
def test_int4_wgmma_default_config(m: int, k: int, n: int) -> None:
    _check(m, k, n, 128, None, seed=m * 7 + n)


@pytest.mark.parametrize("cfg", [
    {"split": 1}, {"split": 4}, {"warpgroups": 2, "split": 2}, {"stages": 2, "split": 2},
    {"np_": 64, "split": 8}, {"np_": 128, "warpgroups": 2, "stages": 3},
    {"warpgroups": 4}, {"np_": 64, "warpgroups": 4, "split": 4}])
@pytest.mark.parametrize("m", [40, 128, 160])
def test_int4_wgmma_configs(cfg: dict, m: int) -> None:
    from orbit.kernels.int4_wgmma import WgmmaConfig

    _check(m, 4096, 1024 + 64, 128, WgmmaConfig(**cfg), seed=m + len(cfg))


@pytest.mark.parametrize("m", [48, 256])
def test_int4_wgmma_group_64(m: int) -> None:
    _check(m, 2048, 512, 64, None, seed=m)


@pytest.mark.parametrize("m", [17, 64, 100, 256])
@pytest.mark.parametrize("k,n", [(2048, 6144), (6144, 2048), (2048, 200)])
def test_nvfp4_wgmma_default_config(m: int, k: int, n: int) -> None:
    _check(m, k, n, 16, None, seed=m * 5 + n, fmt="nvfp4")


@pytest.mark.parametrize("cfg", [{"split": 4}, {"np_": 64, "warpgroups": 4}, {"stages": 2}])
def test_nvfp4_wgmma_configs(cfg: dict) -> None:
    from orbit.kernels.int4_wgmma import WgmmaConfig

    _check(96, 2048, 1024 + 64, 16, WgmmaConfig(**cfg), seed=len(cfg), fmt="nvfp4")


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_route_runs_it_where_asked(fmt: str, monkeypatch) -> None:
    """With `_qgemm.WGMMA_ROWS` on, fast mode's forward (dispatch.qmm) at 33-256 rows is this
    kernel's output, bit for bit."""
    from orbit.kernels import _qgemm
    from orbit.kernels.dispatch import qmm

    monkeypatch.setattr(_qgemm, "WGMMA_ROWS", {fmt: (33, 256)})
    kw = {"group_size": 128} if fmt == "int4" else {}
    qw = random_qweight(fmt, 512, 2048, seed=9, device="cuda", **kw)
    x = torch.randn(80, 2048, device="cuda").bfloat16()
    assert _qgemm.route(80, 512, 2048, fmt, False, x.device, mma_ok=True).kind == "wgmma"
    assert torch.equal(qmm(x, qw), _run(x, qw))


def test_int4_wgmma_one_hot_rows_read_the_dequantized_weights() -> None:
    """x = rows of the identity: y[i] must equal column i of the dequantized W, bit for bit
    (each weight is bf16(s * (u - 8)) before the MMA; one nonzero product per output)."""
    from orbit.kernels.int4_wgmma import WgmmaConfig

    k, n, m = 512, 192, 128
    qw = random_qweight("int4", n, k, seed=3, device="cuda", group_size=128)
    w = qw.dequantize().bfloat16()
    x = torch.zeros(m, k, device="cuda", dtype=torch.bfloat16)
    cols = torch.arange(m, device="cuda") * 3
    x[torch.arange(m, device="cuda"), cols] = 1.0
    for cfg in (None, WgmmaConfig(np_=64, split=2)):
        y = _run(x, qw, cfg)
        assert torch.equal(y, w[:, cols].T.contiguous()), cfg
