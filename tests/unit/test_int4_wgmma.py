"""The INT4 wgmma kernel for rollout rows (orbit/kernels/int4_wgmma.py) on a machine without a
GPU: its config rules, the refusals, and the real kernel compiled for sm_90 with Triton's
bundled ptxas (the CPU interpreter does not run Gluon), checked in SASS for what the design
promises: four 64 x NP x 16 wgmmas per 64-deep step with the decoded weights as the register
operand, x by TMA, the decode's packed subtract and scale once per nibble pair, no spills."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from orbit.kernels import int4_wgmma as W


def test_column_tile_and_pick() -> None:
    assert W.column_tile(17) == 64 and W.column_tile(64) == 64 and W.column_tile(65) == 128
    # 2048 x 6144 (down): 32 one-warpgroup row tiles (16 of two: too few), split 8 keeps
    # 256 programs on 132 SMs
    c = W.pick_config(64, 6144, 2048, 128, 132)
    assert (c.np_, c.warpgroups, c.split) == (64, 1, 8)
    # 12288 rows (stacked gate/up): 48 four-warpgroup tiles, twice over the columns at 256
    # rows: 96 >= 132 / 2 programs, split 2 then
    c = W.pick_config(256, 2048, 12288, 128, 132)
    assert (c.np_, c.warpgroups, c.split) == (128, 4, 2)
    # slices stay >= MIN_SLICE_K and whole groups
    for m in (33, 128, 256):
        for k, n in ((2048, 4096), (6144, 2048), (2048, 1024), (512, 64)):
            c = W.pick_config(m, k, n, 128, 132)
            assert k % (c.split * 128) == 0
            assert c.split == 1 or k // c.split >= W.MIN_SLICE_K


def test_supports() -> None:
    bf, f32 = torch.bfloat16, torch.float32
    assert W.supports(64, 2048, 2048, 128, bf, bf, False) == W.HAS_GLUON
    e4 = torch.float8_e4m3fn
    assert W.supports(64, 2048, 2048, 16, bf, e4, False, "nvfp4") == W.HAS_GLUON
    assert not W.supports(64, 2048, 2048, 32, bf, e4, False, "nvfp4")
    assert not W.supports(64, 2048, 2048, 128, bf, bf, False, "fp8")
    assert not W.supports(257, 2048, 2048, 128, bf, bf, False)
    assert not W.supports(64, 2048, 2048, 32, bf, bf, False)  # groups of 64k only
    assert not W.supports(64, 2048, 2048, 128, bf, bf, True)  # symmetric codes only
    assert not W.supports(64, 2048, 2048, 128, torch.float16, bf, False)
    assert not W.supports(64, 2048, 2048, 128, bf, f32, False)


def test_check_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="np_"):
        W.check_config(W.WgmmaConfig(np_=96), 64, 2048, 128)
    with pytest.raises(ValueError, match="warpgroups"):
        W.check_config(W.WgmmaConfig(warpgroups=3), 64, 2048, 128)
    W.check_config(W.WgmmaConfig(warpgroups=4), 64, 2048, 128)
    with pytest.raises(ValueError, match="split 3"):
        W.check_config(W.WgmmaConfig(split=3), 64, 2048, 128)
    with pytest.raises(ValueError, match="stages"):
        W.check_config(W.WgmmaConfig(stages=1), 64, 2048, 128)


def test_launch_refuses_a_cpu_tensor() -> None:
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 128, 256, group_size=128)
    x = torch.randn(64, 256).bfloat16()
    with pytest.raises(ValueError, match="sm_90|unsupported"):
        W.int4_wgmma(x, qw.tensors["qweight"], qw.tensors["scale"], 128)


def _compile(cfg: W.WgmmaConfig, fmt: str = "int4"):
    pytest.importorskip("triton.experimental.gluon")
    from bench_scripts import load_bench

    tool = load_bench("sm90_compile")
    if not (tool.BIN / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    group = 16 if fmt == "nvfp4" else 128
    consts = dict(W.kernel_constants(cfg, group, 4096 // cfg.split, fmt), PDL=False)
    types = {"x_desc": f"tensordesc<bf16[{cfg.np_}, 64],{W.X_SMEM!r}>",
             "w_desc": f"tensordesc<i32[{cfg.block_n}, 8],{W.W_SMEM!r}>",
             "s_ptr": "*fp8e4nv" if fmt == "nvfp4" else "*bf16", "gs_ptr": "*fp32",
             "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    k = tool.compile_sm90(W._int4_wgmma_kernel, consts, types, cfg.num_warps, 1,
                          frozenset({"stride_q", "stride_s", "stride_y", "K_SLICE", "K"}))
    return tool, k


@pytest.mark.parametrize("cfg,fmt", [
    (W.WgmmaConfig(np_=128), "int4"), (W.WgmmaConfig(np_=64, split=4), "int4"),
    (W.WgmmaConfig(np_=128, warpgroups=2, split=2), "int4"),
    (W.WgmmaConfig(np_=64, warpgroups=4, split=2), "int4"),
    (W.WgmmaConfig(np_=128), "nvfp4"), (W.WgmmaConfig(np_=64, warpgroups=2, split=4), "nvfp4")])
def test_sm90_compile(cfg: W.WgmmaConfig, fmt: str) -> None:
    tool, k = _compile(cfg, fmt)
    from bench_scripts import load_bench

    sass = tool.disassemble(k.asm["cubin"])
    ops = Counter(m.group(1) for m in re.finditer(r"\b(HGMMA|UTMALDG|HFMA2|HMUL2|PRMT)\S*",
                                                   sass))
    assert ops["HGMMA"] == 4  # one 64 x NP x 16 wgmma per 16-deep block of a step
    assert ops["UTMALDG"] >= 4  # words and x by TMA (the prologue's and the loop's)
    # 16 nibble pairs a thread and step: INT4 a packed subtract and a scale each, NVFP4 one
    # scale (its FMA with -0 is a multiply)
    assert ops["HFMA2"] == (16 if fmt == "int4" else 0) and ops["HMUL2"] == 16
    # the register operand: the wgmma reads A from registers (no descriptor for A)
    assert re.search(rf"HGMMA\.64x{cfg.np_}x16\.F32\.BF16 R\d+, R\d+", sass)
    assert "LOCAL:0" in load_bench("sass_int4_mma").resources(k.asm["cubin"])


def test_route_takes_it_only_where_switched_on(monkeypatch) -> None:
    """`_qgemm.route`: the wgmma route for a format's WGMMA_ROWS on sm_90, after int4_mma's
    rows, for plain fast-mode forwards whose operands fit (mma_ok); never on other GPUs, for
    the input gradient or in exact mode; off by default."""
    from orbit.kernels import _qgemm

    if not W.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_qgemm, "_capability", lambda device: (9, 0))


    class NoTable:  # (no route table: a CPU host has no device to name one by)
        def lookup(self, *args) -> None:
            return None

    monkeypatch.setattr(_qgemm, "ROUTES", NoTable())

    def kind(m: int, fmt: str = "int4", **kw) -> str:
        return _qgemm.route(m, 2048, 2048, fmt, kw.pop("exact", False), cuda,
                            mma_ok=kw.pop("mma_ok", True), **kw).kind

    assert _qgemm.WGMMA_ROWS == {}  # off until measured
    assert kind(64) != "wgmma"
    monkeypatch.setattr(_qgemm, "WGMMA_ROWS", {"int4": (33, 256), "nvfp4": (33, 256)})
    assert kind(64) == kind(256) == kind(64, "nvfp4") == "wgmma"
    assert kind(32) == "mma"  # int4_mma's rows first
    assert kind(257) != "wgmma" and kind(64, "fp8") != "wgmma"
    assert kind(64, mma_ok=False) != "wgmma"
    assert kind(64, transpose=True) != "wgmma" and kind(64, exact=True) == "dot"
    monkeypatch.setattr(_qgemm, "_capability", lambda device: (10, 0))  # no wgmma there
    assert kind(64) != "wgmma"
