"""GPU checks of measured quantized-matmul routes (orbit/kernels/qmm_routes.py, qmm_tune.py):
the tuner with the real CUDA-graph timer on Qwen3-1.7B shapes writes a table whose every route
runs and matches the reference; `python -m orbit tune-qmm` end to end; an engine decoding with
a table installed gives the same tokens as with the rules where the table changes nothing, and
valid samples where it does. Run: `pytest -m gpu tests/gpu/test_qmm_routes_gpu.py`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orbit.kernels.dispatch import qmm
from orbit.kernels.qmm_routes import ROUTES, Route, RouteTable, load_routes
from orbit.kernels.tile_config import TileConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _rules():
    with ROUTES.scoped(None):
        yield


def test_tuner_routes_run_and_match_the_reference() -> None:
    from orbit.kernels.qmm_tune import graph_timer, l2_copies, rel_err, tune, weight_maker

    dev = torch.device("cuda")
    shapes = [(2048, 2048, 1 << 30), (12288, 2048, 4)]
    table, results = tune(shapes, ["int4", "fp8"], [1, 16, 64], weight_maker(dev), l2_copies(dev),
                          graph_timer(reps=5), dev)
    assert len(results) == 2 * (3 + 1)
    for r in results:
        assert r.rules.seconds and r.rules.seconds > 0
        assert r.best.seconds <= r.rules.seconds  # the rules' route is one of the candidates
        assert table.lookup(r.fmt, r.n, r.k, r.m) == r.chosen
    make = weight_maker(dev)
    with ROUTES.scoped(table):
        for fmt in ("int4", "fp8"):
            qw = make(fmt, 2048, 2048, 7)
            for m in (1, 9, 16, 40, 64):
                x = torch.randn(m, 2048, device=dev).bfloat16()
                y = torch.full((m, 2048), float("nan"), device=dev).bfloat16()
                y.copy_(qmm(x, qw))
                ref = x.float() @ qw.dequantize(torch.float32).T
                assert not y.isnan().any() and rel_err(y, ref) < 1e-2, (fmt, m)


def test_cli_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "routes.json"
    proc = subprocess.run([sys.executable, "-m", "orbit", "tune-qmm", "--shapes", "2048x2048",
                           "--formats", "int4", "--m", "1,16", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = load_routes(out)
    assert table.device == torch.cuda.get_device_name()
    assert table.lookup("int4", 2048, 2048, 1) is not None
    assert table.lookup("int4", 2048, 2048, 16) is not None
    assert "of copy" in proc.stdout


def test_engine_under_a_table() -> None:
    """The small Qwen3's INT4 decode shapes routed elsewhere by a table (another tile at 2-4
    rows, dequantize + cuBLAS at 1): the engine's graphs capture those routes and sample
    valid tokens with log-probs close to the rules' run; a table holding the rules' own routes
    gives the rules' bits."""
    from gpu_models import V, mixed_prompts, run_engine, small_qwen3

    from orbit.kernels import _qgemm
    from orbit.kernels.qmm_tune import model_shapes
    from orbit.rollout.types import SamplingParams

    model = small_qwen3("int4")
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=11, ignore_eos=True)
    prompts = mixed_prompts(5)
    dev = torch.device("cuda")
    same, moved = RouteTable(device="x"), RouteTable(device="x")
    for n, k, max_m in model_shapes(model.config):
        for m in (1, 4):
            if m <= max_m:
                with ROUTES.scoped(None):  # the rules' own route, whatever table ships
                    same.add("int4", n, k, m, _qgemm.route(m, n, k, "int4", False, dev))
        moved.add("int4", n, k, 1, Route("dequant"))
        if max_m >= 4:
            moved.add("int4", n, k, 4, Route("dot", TileConfig(bm=16, bo=64, br=64, warps=4,
                                                                stages=3)))
    runs = {}
    for name, table in (("rules", None), ("same", same), ("moved", moved)):
        with ROUTES.scoped(table):
            _, comps = run_engine(model, prompts, sp, 4)
        runs[name] = comps
    assert [c.tokens for c in runs["same"]] == [c.tokens for c in runs["rules"]]
    assert [c.logprobs for c in runs["same"]] == [c.logprobs for c in runs["rules"]]
    for c in runs["moved"]:
        assert len(c.tokens) == 16 and all(0 <= t < V for t in c.tokens)
        assert all(lp <= 0 for lp in c.logprobs)
    # the first decode step (the prefill before it is past every bucket: the rules') in
    # another summation order: the log-prob of the same second token stays close
    first = [(a.logprobs[1], b.logprobs[1]) for a, b in zip(runs["rules"], runs["moved"])
             if a.tokens[:2] == b.tokens[:2]]
    assert first and max(abs(a - b) for a, b in first) < 0.05, first
