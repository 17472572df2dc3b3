"""bench_engine.py's per-run switches: --plane-tiles specs map onto the gemv module's tile rule
constants (and what pick_gemv_config then returns), --knob sets a named module constant, and a
malformed spec fails with the flag's name."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))


@pytest.fixture
def gemv_consts(monkeypatch: pytest.MonkeyPatch):
    from orbit.kernels import gemv

    for name in ("PLANES_BLOCK_N_SMALL_M", "GEMV_MAX_SPLIT", "PLANES_M1_UNSPLIT",
                 "PLANES_BLOCK_N_M1_UNSPLIT"):
        monkeypatch.setattr(gemv, name, getattr(gemv, name))  # restored after the test
    return gemv


def test_plane_tile_specs(gemv_consts) -> None:
    import bench_engine as b

    gemv = gemv_consts
    b.set_plane_tile("split")
    c = gemv.pick_gemv_config(1, 2048, 2048, "int4", 132)
    assert (c.block_n, c.split) == (32, 2)
    b.set_plane_tile("bn8")
    c = gemv.pick_gemv_config(1, 2048, 2048, "int4", 132)
    assert (c.block_n, c.split) == (8, 1)
    assert gemv.pick_gemv_config(1, 12288, 2048, "int4", 132).block_n == 32  # fills the SMs
    b.set_plane_tile("bn16s1")  # the split rule's tile, at most one slice
    c = gemv.pick_gemv_config(1, 12288, 2048, "int4", 132)
    assert (c.block_n, c.split) == (16, 1)
    b.set_plane_tile("default")
    c = gemv.pick_gemv_config(1, 2048, 2048, "int4", 132)
    assert (c.block_n, c.split) == (16, 1)
    for bad in ("bn", "16", "bnxs1", "bn8sx"):
        with pytest.raises(SystemExit, match="--plane-tiles"):
            b.set_plane_tile(bad)


def test_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_engine as b

    from orbit.kernels import attention_decode as a

    monkeypatch.setattr(a, "SPLIT_MAX", a.SPLIT_MAX)
    runs = b.knob_values("orbit.kernels.attention_decode.SPLIT_MAX=1,2")
    assert runs == ["orbit.kernels.attention_decode.SPLIT_MAX=1",
                    "orbit.kernels.attention_decode.SPLIT_MAX=2"]
    b.set_knob(runs[0])
    assert a.SPLIT_MAX == 1 and a.pick_decode(1, 8, 224, 132)[0] == 1
    assert b.knob_values(None) == [None]
    assert b.knob_values("m.X=('int4',),('int4', 'nvfp4')") == ["m.X=('int4',)",
                                                               "m.X=('int4', 'nvfp4')"]
    for bad in ("SPLIT_MAX", "m.X=", "m.X=(1,", "m.X=int4"):
        with pytest.raises(SystemExit, match="--knob"):
            b.knob_values(bad)
    with pytest.raises(SystemExit, match="has no"):
        b.set_knob("orbit.kernels.attention_decode.NOPE=1")


def test_set_fixes_constants_before_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """--set MODULE.NAME=V (repeatable) fixes a constant for the whole process, under a --knob
    sweep of another; a sweep given to --set fails with the flag's name."""
    import bench_engine as b

    from orbit.adapters import lora_decode
    from orbit.kernels import _qgemm

    monkeypatch.setattr(_qgemm, "LOOP_SHRINK_DOT_MIN_M", _qgemm.LOOP_SHRINK_DOT_MIN_M)
    monkeypatch.setattr(lora_decode, "MAX_ROWS", lora_decode.MAX_ROWS)
    assert b.fixed_knob("orbit.adapters.lora_decode.MAX_ROWS=None") == \
        "orbit.adapters.lora_decode.MAX_ROWS=None"
    with pytest.raises(SystemExit, match="--set: .* has 2 values"):
        b.fixed_knob("orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8,16")
    for spec in ("orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8",
                 "orbit.adapters.lora_decode.MAX_ROWS=63"):
        b.set_knob(b.fixed_knob(spec))  # what main does for each --set, right after parsing
    assert _qgemm.LOOP_SHRINK_DOT_MIN_M == 8 and lora_decode.MAX_ROWS == 63


def test_unknown_section_is_refused(capsys: pytest.CaptureFixture) -> None:
    import bench_engine as b

    with pytest.raises(SystemExit):
        b.main(["--sections", "lora,nope"])
    assert "--sections: ['nope'] not among" in capsys.readouterr().err


def test_fold_norm_runs() -> None:
    import bench_engine as b

    assert b.parse_fold_norm("off,prologue") == [False, "prologue"]
    assert b.parse_fold_norm("both") == [False, True]
    with pytest.raises(SystemExit, match="--fold-norm"):
        b.parse_fold_norm("pro")
