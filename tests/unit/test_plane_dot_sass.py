"""The nibble-plane-pair INT4 step compiles for sm_90 on a machine without a GPU (Triton +
the ptxas and cuobjdump it ships): ptxas accepts the inline-PTX bf16x2 decode, which the
CPU interpreter cannot run, and the SASS holds its packed bf16 FMAs. A static check of the
code the GPU will run; the GPU test (tests/gpu/test_kernels_qmm_gpu.py::test_plane_pair_steps)
checks its values."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_scripts import load_bench

triton = pytest.importorskip("triton")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _sass_module():
    mod = load_bench("sass_qmm")
    return mod


@pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                    reason="this Triton ships no ptxas/cuobjdump")
def test_plane_pair_asm_decode_compiles_for_sm90() -> None:
    mod = _sass_module()
    consts = {"BM": 16, "BO": 64, "BR": 128, "STAGES": 3}
    n_asm, ops_asm = mod.sass_histogram("int4_pairs", {**consts, "ASM": True}, 4)
    n_plain, ops_plain = mod.sass_histogram("int4_pairs", {**consts, "ASM": False}, 4)
    asm, plain = dict(ops_asm), dict(ops_plain)
    # 64 weights per thread per step = 32 words x (1 HFMA2 + 1 HMUL2 or 2 HFMA2)
    assert asm.get("HFMA2", 0) + asm.get("HMUL2", 0) >= 64, ops_asm[:15]
    assert "HFMA2" not in plain and plain.get("FMUL", 0) >= 64, ops_plain[:15]
    assert asm.get("HMMA", 0) > 0 and plain.get("HMMA", 0) > 0  # the dots are tensor-core MMAs
    assert n_asm < n_plain, (n_asm, n_plain)


@pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                    reason="this Triton ships no ptxas/cuobjdump")
def test_nvfp4_plane_pair_asm_decode_compiles_for_sm90() -> None:
    """NVFP4 over plane pairs: ptxas accepts the E2M1 bf16x2 decode, one packed bf16 op per
    word pair (64 weights per thread per step = 32 pairs), tensor-core dots, and fewer
    instructions than the plain pairs and than the `nvfp4_tile` loop it replaces."""
    mod = _sass_module()
    consts = {"BM": 16, "BO": 64, "BR": 128, "STAGES": 3}
    n_asm, ops_asm = mod.sass_histogram("nvfp4_pairs", {**consts, "ASM": True}, 4)
    n_plain, _ = mod.sass_histogram("nvfp4_pairs", {**consts, "ASM": False}, 4)
    n_loop, _ = mod.sass_histogram("nvfp4_loop", {**consts, "ASM": False}, 4)
    asm = dict(ops_asm)
    assert asm.get("HFMA2", 0) + asm.get("HMUL2", 0) >= 32, ops_asm[:15]
    assert asm.get("HMMA", 0) > 0
    assert n_asm < n_plain < n_loop, (n_asm, n_plain, n_loop)


@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="this Triton ships no ptxas")
def test_one_stage_pairs_keep_the_weights_out_of_shared_memory() -> None:
    """The register-fed tiles' premise (plane_dot.py, "Register-fed"): with one stage the NVFP4
    pair step puts no weight tile in shared memory, swapped (wgmma A operand) or not (16-row
    mma.sync); with 4 stages the pipeliner does. A Triton that changes this changes what the
    tuner's register-fed candidates are."""
    mod = _sass_module()
    one = {"BM": 16, "BO": 64, "BR": 128, "STAGES": 1, "ASM": True}
    assert mod.weight_tiles_in_smem("nvfp4_swapped", one, 4) == 0
    assert mod.weight_tiles_in_smem("nvfp4_pairs", one, 4) == 0
    assert mod.weight_tiles_in_smem("nvfp4_swapped", {**one, "STAGES": 4}, 4) > 0
