"""Route tables for fast-mode quantized matmuls (orbit/kernels/qmm_routes.py), the one routing
decision `_qgemm.route` that every caller shares, and the tuner that writes the tables
(orbit/kernels/qmm_tune.py, `python -m orbit tune-qmm`).

CPU: the file format and its errors, bucket lookups, the resolution order (installed table,
ORBIT_QMM_ROUTES, shipped per-device file), that launch and the store-fusion questions
(`lora_fits`, `swiglu_fits`) follow a table, and, under Triton's interpreter, that a forced
route runs the kernel it names with the reference's numbers and that the tuner checks,
times (a deterministic injected timer) and writes a table the router then follows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

from orbit.kernels import _qgemm
from orbit.kernels.qmm_routes import (
    ENV_VAR,
    ROUTES,
    Route,
    RouteTable,
    RouteTableError,
    device_slug,
    load_routes,
    parse_routes,
    save_routes,
)
from orbit.kernels.tile_config import TileConfig

CPU = torch.device("cpu")
CFG = TileConfig(bm=16, bo=32, br=64, warps=4, stages=3)


@pytest.fixture(autouse=True)
def _default_routes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    ROUTES.reset()
    yield
    ROUTES.reset()


def _doc(*routes: dict) -> dict:
    return {"format": "orbit-qmm-routes", "version": 1, "device": "cpu", "routes": list(routes)}


def _entry(**kw) -> dict:
    e = {"fmt": "int4", "n": 2048, "k": 2048, "m_max": 16, "kind": "dot",
         "config": {"bm": 16, "bo": 64, "br": 128, "warps": 4, "stages": 4}}
    e.update(kw)
    return e


def test_lookup_takes_the_smallest_bucket_that_covers_m() -> None:
    t = RouteTable(device="x")
    t.add("int4", 64, 128, 4, Route("gemv"))
    t.add("int4", 64, 128, 1, Route("dequant"))
    t.add("int4", 64, 128, 64, Route("dot", CFG))
    assert t.lookup("int4", 64, 128, 1) == Route("dequant")
    assert t.lookup("int4", 64, 128, 2) == Route("gemv")
    assert t.lookup("int4", 64, 128, 4) == Route("gemv")
    assert t.lookup("int4", 64, 128, 5) == Route("dot", CFG)
    assert t.lookup("int4", 64, 128, 65) is None  # past the last bucket: the rules
    assert t.lookup("fp8", 64, 128, 1) is None and t.lookup("int4", 64, 256, 1) is None


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    t = RouteTable(device="NVIDIA H200")
    t.add("int4", 6144, 2048, 16, Route("dot", CFG), {"us": 7.5, "rules_us": 9.0})
    t.add("fp8", 2048, 6144, 1, Route("gemv"))
    t.add("nvfp4", 12288, 2048, 512, Route("dequant"))
    path = tmp_path / "sub" / "routes.json"
    save_routes(t, path, {"tool": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["routes.json"]  # no temporary left
    back = load_routes(path)
    assert back.device == "NVIDIA H200" and back.routes == t.routes
    entry = next(e for e in json.loads(path.read_text())["routes"] if e["fmt"] == "int4")
    assert entry["us"] == 7.5 and entry["config"]["bm"] == 16  # measured times kept
    assert "swap" not in entry["config"]  # written only where set


def test_swapped_tiles_round_trip_and_take_no_epilogue(tmp_path: Path) -> None:
    from orbit.kernels.qmm_tune import candidates, split_variants

    swapped = TileConfig(bm=16, bo=64, br=128, warps=4, stages=3, swap=True)
    t = RouteTable(device="cpu")
    t.add("int4", 64, 128, 16, Route("dot", swapped))
    t.add("int4", 64, 128, 64, Route("dot", CFG))
    save_routes(t, tmp_path / "r.json")
    back = load_routes(tmp_path / "r.json")
    assert back.routes == t.routes and back.lookup("int4", 64, 128, 4).config.swap
    with ROUTES.scoped(back):  # the swapped loop stores y^T: no LoRA epilogue, the plain one has
        assert not _qgemm.lora_fits(4, 64, 128, "int4", False, CPU)
        assert _qgemm.lora_fits(20, 64, 128, "int4", False, CPU)
    # a table's loop at the rules' dequantize rows (rollout sizes) takes no LoRA epilogue: the
    # decode groups add the delta after the base there, as they did on the dequantize route
    t.add("int4", 64, 128, 256, Route("dot", CFG))
    with ROUTES.scoped(t):
        m_dq = _qgemm.dequant_min_m("int4")
        assert _qgemm.route(m_dq, 64, 128, "int4", False, CPU).kind == "dot"
        assert _qgemm.lora_fits(m_dq - 1, 64, 128, "int4", False, CPU)
        assert not _qgemm.lora_fits(m_dq, 64, 128, "int4", False, CPU)
    # the tuner tries swapped tiles up to 64 rows (x rows rounded up to 16..64), split where
    # their tiles leave SMs idle
    for m, bm in ((1, 16), (16, 16), (33, 64)):
        sw = [c.config for c in candidates(m, 2048, 2048, "fp8", CPU)[1]
              if c.kind == "dot" and c.config.swap]
        assert sw and {c.bm for c in sw} == {bm} and all(c.br <= 128 for c in sw), m
        assert all(c.split > 1 for c in split_variants(sw[0], m, 2048, 2048, 132))
    assert not any(c.config.swap for c in candidates(65, 2048, 2048, "int4", CPU)[1]
                   if c.kind == "dot")


def test_plane_pair_tiles_round_trip_and_are_tuned_for_4bit_formats_only(tmp_path: Path) -> None:
    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS
    from orbit.kernels.qmm_tune import PAIRS_MAX_M, candidates, describe

    pairs = TileConfig(bm=16, bo=32, br=128, warps=4, stages=4, split=8,
                       unpack=UNPACK_PLANE_PAIRS)
    t = RouteTable(device="cpu")
    t.add("int4", 2048, 6144, 16, Route("dot", pairs))
    save_routes(t, tmp_path / "r.json")
    back = load_routes(tmp_path / "r.json")
    assert back.lookup("int4", 2048, 6144, 4).config == pairs
    assert describe(Route("dot", pairs)).endswith("k/8 pairs")
    bad = json.loads((tmp_path / "r.json").read_text())
    bad["routes"][0]["config"]["unpack"] = 4
    with pytest.raises(RouteTableError, match="'unpack'"):
        parse_routes(bad, "t.json")
    bad["routes"][0]["config"]["unpack"] = 3
    bad["routes"][0]["fmt"] = "fp8"
    with pytest.raises(RouteTableError, match="nibble-plane pairs"):
        parse_routes(bad, "t.json")

    def n_pairs(m: int, fmt: str) -> int:
        return sum(r.kind == "dot" and r.config.unpack == UNPACK_PLANE_PAIRS
                   for r in candidates(m, 2048, 2048, fmt, CPU)[1])

    assert n_pairs(1, "int4") > 0 and n_pairs(PAIRS_MAX_M, "int4") > 0
    assert n_pairs(PAIRS_MAX_M + 1, "int4") == 0 and n_pairs(16, "nvfp4") > 0
    assert n_pairs(16, "mxfp4") > 0 and n_pairs(16, "fp8") == 0
    # register-fed tiles: pairs with one stage, split up to 16 programs per SM
    from orbit.kernels.qmm_tune import REG_FED_MAX_PROGRAMS_PER_SM, register_fed_configs

    rf = register_fed_configs(4, 12288, 4096, "nvfp4", 132)
    assert rf and all(c.unpack == UNPACK_PLANE_PAIRS and c.stages == 1 for c in rf)
    assert any(c.swap for c in rf) and any(not c.swap and c.bm == 16 for c in rf)
    assert all(c.swap for c in register_fed_configs(33, 12288, 4096, "nvfp4", 132))
    assert {c.split for c in rf} == {1, 2, 4, 8, 16} and all(
        -(-12288 // c.bo) * c.split <= REG_FED_MAX_PROGRAMS_PER_SM * 132 for c in rf)
    assert register_fed_configs(65, 2048, 2048, "int4", 132) == []
    only = candidates(4, 2048, 2048, "nvfp4", CPU, "regfed")[1]
    assert {r.kind for r in only} >= {"dequant", "gemv"} and all(
        r.config.unpack == UNPACK_PLANE_PAIRS and r.config.stages == 1
        for r in only[1:] if r.kind == "dot")
    assert register_fed_configs(4, 2048, 2048, "fp8", 132) == []
    t2 = RouteTable(device="cpu")
    t2.add("nvfp4", 2048, 6144, 16, Route("dot", rf[-1]))
    save_routes(t2, tmp_path / "rf.json")
    assert load_routes(tmp_path / "rf.json").lookup("nvfp4", 2048, 6144, 4).config == rf[-1]


@pytest.mark.parametrize(("doc", "needle"), [
    ([], "not an Orbit route table"),
    ({"format": "orbit-qmm-routes", "version": 2, "device": "x", "routes": []}, "'version'"),
    ({"format": "orbit-qmm-routes", "version": 1, "routes": []}, "'device'"),
    ({"format": "orbit-qmm-routes", "version": 1, "device": "x", "routes": {}}, "'routes'"),
    (_doc(_entry(fmt="int3")), "routes[0]: field 'fmt'"),
    (_doc(_entry(), _entry(n=-1)), "routes[1]: field 'n'"),
    (_doc(_entry(kind="cublas")), "field 'kind'"),
    (_doc(_entry(config={"bm": 16, "bo": 64, "br": 128, "warps": 3, "stages": 4})), "'warps'"),
    (_doc(_entry(config={"bm": 24, "bo": 64, "br": 128, "warps": 4, "stages": 4})), "'bm'"),
    (_doc(_entry(config={"bm": 16, "bo": 64, "br": 128, "warps": 4})), "'stages'"),
    (_doc(_entry(config={"bm": 16, "bo": 64, "br": 128, "warps": 4, "stages": 4, "x": 1})),
     "unknown config field"),
    (_doc(_entry(config={"bm": 16, "bo": 64, "br": 128, "warps": 4, "stages": 4, "swap": 1})),
     "'swap' must be true or false"),
    (_doc(_entry(kind="dequant")), "'config' belongs to kind 'dot'"),
    (_doc(_entry(kind="gemv", m_max=16, config=None)), "field 'config' belongs"),
    (_doc({k: v for k, v in _entry(kind="gemv", m_max=16).items() if k != "config"}),
     "kind 'gemv' serves at most"),
    (_doc(_entry(), _entry()), "routes[1]: "),
    (_doc(_entry(), _entry()), "two routes for int4 n=2048 k=2048 m_max=16"),
])
def test_bad_tables_name_the_entry_and_field(doc, needle: str) -> None:
    with pytest.raises(RouteTableError) as e:
        parse_routes(doc, "routes.json")
    assert "routes.json" in str(e.value) and needle in str(e.value), str(e.value)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(RouteTableError, match="cannot read"):
        load_routes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "orbit-qmm-routes",\n "version": 1,,\n}')
    with pytest.raises(RouteTableError, match=r"bad.json: line 2, column"):
        load_routes(bad)


def test_route_follows_the_table_in_fast_forwards_only() -> None:
    n, k = 2048, 6144
    rules = _qgemm.route(1, n, k, "int4", False, CPU)
    assert rules == Route("gemv")  # int4 at M = 1: the plane GEMV by rule
    t = RouteTable(device="cpu")
    t.add("int4", n, k, 1, Route("dot", CFG))
    t.add("int4", n, k, 256, Route("dequant"))
    with ROUTES.scoped(t):
        assert _qgemm.route(1, n, k, "int4", False, CPU) == Route("dot", CFG)
        assert _qgemm.route(100, n, k, "int4", False, CPU) == Route("dequant")
        beyond = _qgemm.route(300, n, k, "int4", False, CPU)  # past the last bucket
        # exact mode and the input gradient never read a table
        assert _qgemm.route(1, n, k, "int4", True, CPU).config == _qgemm.pick_config(1, n, "int4", True)
        assert _qgemm.route(40, n, k, "int4", False, CPU, transpose=True).kind == "dot"
        # the store-fusion questions ask the same router
        assert not _qgemm.use_gemv(1, n, k, "int4", CPU)
        assert _qgemm.lora_fits(1, n, k, "int4", False, CPU, 1)
        assert not _qgemm.lora_fits(1, n, k, "int4", False, CPU, 3)  # several members: GEMV only
        assert not _qgemm.swiglu_fits(1, n, k, "int4", False, CPU)
        assert not _qgemm.lora_fits(100, n, k, "int4", False, CPU, 1)  # dequantize + cuBLAS
    assert _qgemm.route(1, n, k, "int4", False, CPU) == rules  # restored
    # past the table: the rules (INT4 from 64 rows: dequantize + cuBLAS; below, the loop)
    assert beyond == _qgemm.route(300, n, k, "int4", False, CPU) == Route("dequant")
    assert _qgemm.route(40, n, k, "int4", False, CPU) == Route(
        "dot", _qgemm.pick_config(40, n, "int4", False))


def test_dequantize_from_the_measured_rows_per_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast-mode forwards and input gradients switch to dequantize + cuBLAS at their format's
    measured row count (DEQUANT_MIN_M_BY_FMT), other formats at DEQUANT_MIN_M; BF16 and exact
    mode never do; the LoRA epilogue's reach ends where the loop does."""
    n, k = 2048, 6144
    with ROUTES.scoped(RouteTable(device="cpu")):  # the rules alone
        for fmt, lo in (("nvfp4", 32), ("int4", 64), ("fp8", 128), ("mxfp4", 1024),
                        ("int8", 1024)):
            assert _qgemm.dequant_min_m(fmt) == lo
            assert _qgemm.route(lo, n, k, fmt, False, CPU).kind == "dequant"
            assert _qgemm.route(lo, n, k, fmt, False, CPU, transpose=True).kind == "dequant"
            assert _qgemm.route(lo - 1, n, k, fmt, False, CPU).kind != "dequant"
            assert _qgemm.route(lo, n, k, fmt, True, CPU).kind == "dot"  # exact mode
            assert not _qgemm.lora_fits(lo, n, k, fmt, False, CPU, 1)
        assert _qgemm.route(4096, n, k, "bf16", False, CPU).kind == "dot"
        monkeypatch.setattr(_qgemm, "DEQUANT_MIN_M_BY_FMT", {})
        assert _qgemm.route(64, n, k, "int4", False, CPU).kind == "dot"
        assert _qgemm.route(1024, n, k, "int4", False, CPU).kind == "dequant"


def test_environment_variable_and_shipped_tables(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from orbit.kernels import qmm_routes

    t = RouteTable(device="cpu")
    t.add("fp8", 64, 128, 8, Route("dequant"))
    path = tmp_path / "r.json"
    save_routes(t, path)
    monkeypatch.setenv(ENV_VAR, str(path))
    ROUTES.reset()
    assert ROUTES.lookup(CPU, "fp8", 64, 128, 3) == Route("dequant")
    monkeypatch.setenv(ENV_VAR, "off")
    ROUTES.reset()
    assert ROUTES.table_for(CPU) is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope.json"))
    ROUTES.reset()
    with pytest.raises(RouteTableError, match=f"{ENV_VAR}=.*nope.json"):
        ROUTES.table_for(CPU)
    # no variable: the file shipped for the device, by its slug
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(qmm_routes, "SHIPPED_DIR", tmp_path)
    ROUTES.reset()
    assert ROUTES.table_for(CPU) is None
    save_routes(t, tmp_path / f"{device_slug('cpu')}.json")
    ROUTES.reset()
    assert ROUTES.lookup(CPU, "fp8", 64, 128, 8) == Route("dequant")
    # an installed table wins over both
    ROUTES.install(None)
    assert ROUTES.table_for(CPU) is None
    assert device_slug("NVIDIA H200") == "nvidia_h200"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_model_shapes_and_candidates() -> None:
    from orbit.entrypoints.tune_qmm import model_config
    from orbit.kernels.qmm_tune import candidates, model_shapes

    shapes = model_shapes(model_config("qwen3-1.7b"))
    big = 1 << 30
    assert (2048, 2048, big) in shapes and (1024, 2048, big) in shapes  # q, o; k/v
    assert (6144, 2048, big) in shapes and (2048, 6144, big) in shapes  # gate/up, down
    # stacked q/k/v and gate/up: decode sizes and the dequantize rows (SIBLING_FROM_DEQUANT)
    assert (4096, 2048, big) in shapes and (12288, 2048, big) in shapes
    decode_only = model_shapes(model_config("qwen3-1.7b"), sibling_max_m=4)
    assert (4096, 2048, 4) in decode_only and (12288, 2048, 4) in decode_only
    rules, cands = candidates(1, 2048, 2048, "int4", CPU)
    assert cands[0] == rules and Route("dequant") in cands and Route("gemv") in cands
    assert len(set(cands)) == len(cands) and all(
        c.config.br <= 128 for c in candidates(64, 2048, 2048, "fp8", CPU)[1] if c.kind == "dot")
    _, big_m = candidates(256, 2048, 2048, "int4", CPU)
    assert Route("gemv") not in big_m and {c.config.bm for c in big_m if c.kind == "dot"} == {64, 128}


def test_update_keeps_what_a_run_did_not_measure() -> None:
    from orbit.entrypoints.tune_qmm import merge_routes

    old = RouteTable(device="gpu")
    old.add("int4", 64, 128, 4, Route("gemv"), {"us": 3.0})
    old.add("fp8", 64, 128, 4, Route("dequant"))
    old.add("int4", 64, 128, 16, Route("dequant"))
    new = RouteTable(device="gpu")
    new.add("int4", 64, 128, 16, Route("dot", CFG))
    new.add("int4", 64, 128, 256, Route("dequant"))
    assert merge_routes(new, old) == 2
    assert new.lookup("fp8", 64, 128, 2) == Route("dequant")  # another format: kept
    assert new.lookup("int4", 64, 128, 2) == Route("gemv")  # a row count not re-measured: kept
    assert new.lookup("int4", 64, 128, 9) == Route("dot", CFG)  # re-measured: replaced
    assert new.lookup("int4", 64, 128, 100) == Route("dequant")  # new row counts added
    assert new.extra[("int4", 64, 128, 4)] == {"us": 3.0}  # its measurement rides along
    with pytest.raises(ValueError, match="measured on 'gpu'"):
        merge_routes(RouteTable(device="other"), old)


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture) -> None:
    from orbit.entrypoints.tune_qmm import main, parse_shapes

    assert parse_shapes("2048x6144") == [(6144, 2048, 1 << 30)]
    for argv, needle in ((["--formats", "int3"], "--formats"), (["--m", "0"], "--m"),
                         (["--shapes", "20x"], "--shapes"), (["--model", "/nope"], "--model"),
                         (["--min-gain", "1.5"], "--min-gain")):
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--shapes", "64x64"]) == 2
        assert "CUDA GPU" in capsys.readouterr().err


# ---------------------------------------------------------------- under Triton's interpreter

def _forced_runs() -> dict:
    """Each route kind forced by a table on a tiny int4 weight: which path ran, and its error
    against the reference."""
    from orbit.kernels import gemv as gemv_mod
    from orbit.kernels.int4 import int4_matmul
    from orbit.kernels.qmm_tune import rel_err
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 64, 128, group_size=32, seed=1)
    out = {}
    calls: list[str] = []
    real_deq, real_gemv = _qgemm.dequantize_weight, gemv_mod.gemv
    _qgemm.dequantize_weight = lambda *a, **k: (calls.append("dequant"), real_deq(*a, **k))[1]
    gemv_mod.gemv = lambda *a, **k: (calls.append("gemv"), real_gemv(*a, **k))[1]
    try:
        for m, route in ((1, Route("dot", CFG)), (3, Route("gemv")), (5, Route("dequant")),
                         (20, Route("dot", TileConfig(bm=32, bo=64, br=128, warps=4, stages=2)))):
            x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).bfloat16()
            t = RouteTable(device="cpu")
            t.add("int4", 64, 128, m, route)
            calls.clear()
            with ROUTES.scoped(t):
                y = int4_matmul(x, qw)
            ref = x.float() @ qw.dequantize(torch.float32).T
            out[str(m)] = {"calls": list(calls), "err": rel_err(y, ref)}
    finally:
        _qgemm.dequantize_weight, gemv_mod.gemv = real_deq, real_gemv
    return out


def _tuned() -> dict:
    """The tuner on two tiny shapes with a timer that makes the last candidate that passed its
    check the fastest (M = 4) or every candidate equal (M = 1: the rules' route stays)."""
    import tempfile

    from orbit.kernels.qmm_tune import candidates, tune, weight_maker

    times: list[float] = []

    def timer(calls):  # does not run the closures (the check already did, once)
        t = 1.0 if ctx["m"] == 1 else 1.0 - 0.01 * len(times)
        times.append(t)
        return t

    ctx = {"m": 1}
    logged = []

    def log(r):
        logged.append({"m": r.m, "n": r.n, "chosen": [r.chosen.kind, str(r.chosen.config)],
                       "rules": [r.rules.route.kind, str(r.rules.route.config)],
                       "last_ok": [next(c for c in reversed(r.candidates) if c.seconds).route.kind,
                                   str(next(c for c in reversed(r.candidates)
                                            if c.seconds).route.config)],
                       "failed": [c.note for c in r.candidates if c.seconds is None]})
        times.clear()

    out: dict = {"runs": logged}
    for m in (1, 4):
        ctx["m"] = m
        table, _ = tune([(64, 128, 1 << 30), (32, 64, 2)], ["int4"], [m],
                        weight_maker(CPU, 32), lambda nbytes: 2, timer, CPU, "quick", 0.03, log)
        path = Path(tempfile.mkdtemp()) / "t.json"
        save_routes(table, path)
        loaded = load_routes(path)
        with ROUTES.scoped(loaded):
            r = _qgemm.route(m, 64, 128, "int4", False, CPU)
        out[f"route{m}"] = [r.kind, str(r.config)]
        out[f"entries{m}"] = sorted(f"{f}:{n}x{k}:{mm}" for (f, n, k), v in loaded.routes.items()
                                    for mm, _ in v)
    out["n_candidates4"] = len(candidates(4, 64, 128, "int4", CPU)[1])
    return out


def _broken_candidate() -> dict:
    """A tile the kernel cannot build (a non-power-of-two step) is reported, not timed."""
    from orbit.kernels.qmm_tune import measure, weight_maker

    qw = weight_maker(CPU, 32)("int4", 64, 128, 0)
    x = torch.randn(2, 128).bfloat16()
    ref = x.float() @ qw.dequantize(torch.float32).T
    bad = measure(Route("dot", TileConfig(bm=16, bo=32, br=48, warps=4, stages=2)), x, [qw],
                  lambda calls: 1.0, ref)
    return {"seconds": bad.seconds, "note": bad.note}


# (fmt, random_qweight kwargs, n, k, m, tile, LoRA: None / "h" given / "a" (h in the launch))
SPLIT_CASES = [
    ("int4", {"group_size": 32}, 80, 320, 5, (16, 32, 64, 2), None),  # column tail, 5 K steps
    ("fp8", {}, 64, 384, 3, (16, 32, 128, 4), None),  # 3 K steps over 4 slices: one is empty
    ("nvfp4", {}, 48, 256, 17, (16, 16, 64, 2), None),  # two row tiles
    ("mxfp4", {}, 64, 256, 9, (16, 32, 64, 4), None),
    ("int4", {"group_size": 32, "asym": True}, 64, 256, 20, (32, 32, 64, 2), "h"),
    ("int4", {"group_size": 32}, 48, 256, 20, (16, 32, 64, 2), "a"),  # + row-block shrink
]


def _split_run(args: tuple, cfg: TileConfig, lora=None) -> torch.Tensor:
    """One launch of args' weight at tile cfg into a NaN-poisoned output; a LoRA epilogue goes
    through the router, so there a table forces the tile."""
    x, fmt, (n, k) = args[0], args[1], args[2]
    m = x.shape[0]
    y = torch.full((m, n), float("nan")).bfloat16()
    if lora is None:
        return _qgemm.launch(*args, y, config=cfg)
    table = RouteTable(device="cpu")
    table.add(fmt, n, k, m, Route("dot", cfg))
    with ROUTES.scoped(table):
        return _qgemm.launch(*args, y, lora=lora)


def _split_runs() -> dict:
    """The tl.dot loop with its K split (TileConfig.split): each slice's fp32 partial into the
    workspace, the last to arrive adds them in slice order; against the reference and the
    unsplit tile, into NaN-poisoned outputs, twice on one counter buffer (re-armed)."""
    from orbit.kernels import gemv as gemv_mod
    from orbit.kernels.lora_decode import lora_expand_add
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.qmm_tune import rel_err
    from orbit.kernels.random_weights import random_qweight

    out = {}
    counters = torch.zeros(64, dtype=torch.int32)
    lcounters = torch.zeros(2, dtype=torch.int32)
    real_arr, real_lc = gemv_mod.arrival_counters, gemv_mod.lora_counters
    gemv_mod.arrival_counters = lambda device, tiles: counters
    gemv_mod.lora_counters = lambda device: lcounters
    try:
        for i, (fmt, kw, n, k, m, (bm, bo, br, split), lo) in enumerate(SPLIT_CASES):
            g = torch.Generator().manual_seed(40 + i)
            qw = random_qweight(fmt, n, k, seed=50 + i, **kw)
            t = qw.tensors
            q, sc = t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv"))
            gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
            group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(fmt, qw.group_size)
            x = torch.randn(m, k, generator=g).bfloat16()
            args = (x, fmt, qw.shape, q, sc, t.get("offset"), gs, group, False, False)
            r = 8
            h = (torch.randn(m, r, generator=g) * 0.5).bfloat16()
            b = ((torch.randn(n, r, generator=g) * 0.5).bfloat16(),)
            a = ((torch.randn(r, k, generator=g) * 0.2).bfloat16(),)
            whole = TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=2)
            cut = TileConfig(bm=bm, bo=bo, br=br, warps=4, stages=2, split=split)

            def run(cfg, lora=None, args=args):
                return _split_run(args, cfg, lora)

            ref = x.float() @ qw.dequantize(torch.float32).T
            base_cut, base_whole = run(cut), run(whole)
            row = {"nan": bool(base_cut.isnan().any()), "err": rel_err(base_cut, ref),
                   "vs_whole": rel_err(base_cut, base_whole),
                   "again": torch.equal(run(cut), base_cut), "counters": int(counters.sum())}
            if lo is not None:
                hh = h if lo == "h" else torch.full((m, r), float("nan")).bfloat16()
                ya = run(cut, LoRAEpilogue(hh, b, 1.5, a if lo == "a" else None))
                yb = run(cut, LoRAEpilogue(hh, b, 1.5, a if lo == "a" else None))
                want_h = h if lo == "h" else (x.float() @ a[0].float().T).bfloat16()
                unfused = base_cut.clone()
                lora_expand_add(want_h, list(b), [unfused], 1.5)
                row.update(lora_nan=bool(ya.isnan().any()), lora_err=rel_err(ya, unfused),
                           lora_again=torch.equal(ya, yb), lcounters=int(lcounters.sum()),
                           delta=float((ya.float() - base_cut.float()).abs().max()))
            out[str(i)] = row
    finally:
        gemv_mod.arrival_counters, gemv_mod.lora_counters = real_arr, real_lc
    return out


def _interpreter_main() -> None:
    patch_interpreter(bf16_dot=True, bf16_round=True)
    print(json.dumps({"forced": _forced_runs(), "tuned": _tuned(), "broken": _broken_candidate(),
                      "split": _split_runs()}))


@pytest.fixture(scope="module")
def interp() -> dict:
    pytest.importorskip("triton")
    return run_in_interpreter(__file__)


def test_forced_routes_run_their_kernel(interp: dict) -> None:
    f = interp["forced"]
    assert f["1"]["calls"] == [] and f["20"]["calls"] == []  # the dot loop
    assert f["3"]["calls"] == ["gemv"] and f["5"]["calls"] == ["dequant"]
    for r in f.values():
        assert r["err"] < 1e-2, f


def test_tuner_checks_times_and_writes_what_the_router_follows(interp: dict) -> None:
    t = interp["tuned"]
    runs = {(r["m"], r["n"]): r for r in t["runs"]}
    assert set(runs) == {(1, 64), (1, 32), (4, 64)}  # (32, 64) only up to its 2 rows
    one, four = runs[(1, 64)], runs[(4, 64)]
    assert one["chosen"] == one["rules"]  # all equal: within min_gain, the rules stay
    assert four["chosen"] == four["last_ok"] != four["rules"]
    assert t["route4"] == four["chosen"] and t["route1"] == one["rules"]
    assert t["entries1"] == ["int4:32x64:1", "int4:64x128:1"] and t["entries4"] == ["int4:64x128:4"]
    assert not four["failed"], four["failed"]
    assert t["n_candidates4"] > 5


def test_a_candidate_that_cannot_run_is_reported(interp: dict) -> None:
    b = interp["broken"]
    assert b["seconds"] is None and b["note"], b


@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_split_k_dot_loop_matches_the_reference(interp: dict, case: int) -> None:
    r = interp["split"][str(case)]
    assert not r["nan"], r  # every element written, by the last slice to arrive
    assert r["err"] < 1e-2 and r["vs_whole"] < 1e-2, r  # another summation order, same sums
    assert r["again"] and r["counters"] == 0, r  # deterministic, counters re-armed
    if "lora_err" in r:
        assert not r["lora_nan"] and r["delta"] > 0, r
        # the final writer adds the delta to its rounded base as the expand kernel does
        assert r["lora_err"] < 1e-2 and r["lora_again"] and r["lcounters"] == 0, r


def test_split_is_fast_forward_only() -> None:
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 64, 128, group_size=32)
    t = qw.tensors
    cut = TileConfig(bm=16, bo=32, br=64, warps=4, stages=2, split=2)
    for transpose, exact in ((True, False), (False, True)):
        x = torch.randn(3, 64 if transpose else 128).bfloat16()
        with pytest.raises(ValueError, match="split=2 runs in fast-mode forwards only"):
            _qgemm.launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32,
                          transpose, exact, config=cut)
    doc = _doc(_entry(config={"bm": 16, "bo": 64, "br": 128, "warps": 4, "stages": 4,
                              "split": 32}))
    with pytest.raises(RouteTableError, match="'split'"):
        parse_routes(doc, "routes.json")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    _interpreter_main()


def test_regfed_rule_reproduces_the_measured_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """_qgemm.regfed_config picks the tiles the H100 tuning chose for NVFP4 at M = 4 and 16
    (docs/benchmarks.md, session 14), and the rule never applies off CUDA, at M = 1, past 16
    rows or to other formats."""
    from orbit.kernels.plane_dot import UNPACK_PLANE_PAIRS

    measured = {(1024, 2048): (64, 8), (2048, 2048): (64, 8), (2048, 6144): (64, 16),
                (4096, 2048): (64, 8), (6144, 2048): (128, 8)}
    for (n, k), (bo, split) in measured.items():
        c = _qgemm.regfed_config(4, n, k, 132)
        assert (c.bo, c.split, c.br, c.stages, c.swap, c.unpack) == (
            bo, split, 128, 1, True, UNPACK_PLANE_PAIRS), (n, k, c)
        assert c.pairs_problem("nvfp4") is None
    assert not _qgemm._regfed_by_rule(4, 2048, 2048, "nvfp4", CPU)
    gpu = torch.device("cuda", 0)
    # (the rule's device test, without a GPU)
    monkeypatch.setattr(_qgemm, "_capability", lambda device: (9, 0))
    assert _qgemm._regfed_by_rule(16, 2048, 6144, "nvfp4", gpu)
    assert _qgemm._regfed_by_rule(4, 12288, 4096, "nvfp4", gpu)  # wide: up to 4 rows
    assert not _qgemm._regfed_by_rule(16, 12288, 4096, "nvfp4", gpu)
    assert not _qgemm._regfed_by_rule(1, 2048, 2048, "nvfp4", gpu)
    assert not _qgemm._regfed_by_rule(8, 2048, 2048, "int4", gpu)
    monkeypatch.setattr(_qgemm, "_capability", lambda device: (8, 0))
    assert not _qgemm._regfed_by_rule(8, 2048, 2048, "nvfp4", gpu)
    with ROUTES.scoped(None):
        r = _qgemm.route(4, 2048, 2048, "nvfp4", False, CPU)
    assert r.kind != "dot" or r.config.unpack != UNPACK_PLANE_PAIRS


def test_compiler_diagnostics_stay_with_the_candidate(monkeypatch: pytest.MonkeyPatch,
                                                      capfd: pytest.CaptureFixture) -> None:
    """What a failing candidate's compile prints on fd 2 (Triton's MLIR pass manager writes
    from C++) goes into that candidate's note, not the terminal; what a working one prints
    there is passed on."""
    import os

    from orbit.kernels import qmm_tune
    from orbit.kernels.random_weights import random_qweight

    with qmm_tune.captured_stderr() as text:
        os.write(2, b"loc: error: Failures have been detected\n")
    assert text == ["loc: error: Failures have been detected\n"]
    assert capfd.readouterr().err == ""

    qw = random_qweight("int4", 64, 128, group_size=32)
    x = torch.randn(2, 128).bfloat16()
    ref = x.float() @ qw.dequantize(torch.float32).T

    def broken(x, qw, **kw):
        os.write(2, b"_qgemm.py:380:0: error: Failures have been detected\n")
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(qmm_tune, "_kernel", lambda qw: broken)
    r = qmm_tune.measure(Route("dequant"), x, [qw], lambda calls: 1.0, ref)
    assert r.seconds is None and r.note.startswith("RuntimeError: PassManager::run failed")
    assert "_qgemm.py:380:0: error" in r.note
    assert capfd.readouterr().err == ""

    def chatty(x, qw, **kw):
        os.write(2, b"a warning\n")
        return ref.bfloat16()

    monkeypatch.setattr(qmm_tune, "_kernel", lambda qw: chatty)
    r = qmm_tune.measure(Route("dequant"), x, [qw], lambda calls: 1.0, ref)
    assert r.seconds == 1.0 and "a warning" in capfd.readouterr().err
