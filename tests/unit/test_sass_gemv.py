"""scripts/bench/sass_gemv.py: the offline sm_90 SASS budget of the plane GEMV's K loop (the
number session 20's profile says a batch-1 GEMV change has to lower). Compiled with
Triton's ptxas as the JIT specializes a real launch: the INT4 batch-1 form's loop holds the
64 AND / FADD / FFMA triples of the 64 nibbles a thread decodes per step plus one FFMA per
word into the deferred accumulator, and loads its words as 16-byte cp.async."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench

triton = pytest.importorskip("triton")


def _tool():
    bin_dir = load_bench("sm90_compile").BIN
    if not ((bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()):
        pytest.skip("this Triton ships no ptxas / cuobjdump")
    return load_bench("sass_gemv")


def test_int4_batch1_loop_budget() -> None:
    tool = _tool()
    from orbit.kernels.gemv import pick_gemv_config

    cfg = pick_gemv_config(1, 4096, 2048, "int4")
    kernel = tool.compile_planes("int4", cfg, 1)
    sass = tool.disassemble(kernel.asm["cubin"])
    n, ops, total = tool.loop_budget(sass)
    nibbles = cfg.block_n * cfg.block_k // (32 * cfg.warps)
    assert ops["FFMA"] == nibbles + nibbles // 8  # a product per nibble, a scale FMA per word
    assert ops["FADD"] == nibbles  # the 2^23 bias off each decoded nibble
    assert 3 * nibbles < n < 8 * nibbles < total
    assert "LDGSTS.E.BYPASS.128" in sass  # the words as 16-byte cp.async (specialized strides)
