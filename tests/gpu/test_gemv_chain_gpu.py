"""The persistent MLP launch (orbit/kernels/gemv_chain.py) on CUDA: one launch with a grid
barrier gives bit for bit the separate `gemv(swiglu=True)` + `gemv` launches and its own
two-phase form, for the 4-bit plane formats at the Qwen3-1.7B and SmolLM2-135M MLP shapes,
with every L2-prefetch mode and fewer programs than work items; the barrier never times out
and its words come back re-armed after many CUDA-graph replays; an engine decodes the same
tokens and log-probs with the chain on and off."""

from __future__ import annotations

import pytest
import torch

from orbit.kernels import gemv
from orbit.kernels.gemv_chain import ChainConfig, mlp_chain, mlp_chain_fits, separate_mlp
from orbit.kernels.grid_barrier import barrier_timed_out, barrier_words
from orbit.kernels.random_weights import random_qweight

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SHAPES = [(2048, 6144), (576, 1536)]  # (hidden, intermediate)


@pytest.fixture(autouse=True)
def _plane_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The persistent MLP chains plane-GEMV forwards; since session 30 INT4 (and NVFP4) take
    the tensor-core kernel from batch 1 (_qgemm.MMA_ROWS), where mlp_chain_fits declines, so
    these tests pin the plane route."""
    from orbit.kernels import _qgemm

    monkeypatch.setattr(_qgemm, "MMA_ROWS", {})


def _weights(fmt: str, hid: int, inter: int):
    kw = {"group_size": 128 if hid % 128 == 0 else 64} if fmt == "int4" else {}
    return (random_qweight(fmt, 2 * inter, hid, seed=hid + 1, device="cuda", **kw),
            random_qweight(fmt, hid, inter, seed=hid + 2, device="cuda", **kw))


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("hid,inter", SHAPES)
@pytest.mark.parametrize("m", [1, 3])
def test_chain_matches_separate_launches(fmt: str, hid: int, inter: int, m: int) -> None:
    torch.manual_seed(hid + m)
    gu, dn = _weights(fmt, hid, inter)
    x = torch.randn(m, hid, device="cuda", dtype=torch.bfloat16)
    sms = gemv.num_sms(x.device)
    cfgs = (gemv.pick_gemv_config(m, 2 * inter, hid, fmt, sms),
            gemv.pick_gemv_config(m, hid, inter, fmt, sms))
    want = separate_mlp(x, gu, dn, cfgs)
    assert not want.isnan().any()
    for cfg in (ChainConfig(fused=False), ChainConfig(prefetch=0), ChainConfig(prefetch=1),
                ChainConfig(prefetch=2), ChainConfig(programs=7),
                ChainConfig(prefetch=0, dataflow=True),
                ChainConfig(prefetch=0, dataflow=True, grid_order=True),
                ChainConfig(programs=7, dataflow=True), ChainConfig(w_preload=1),
                ChainConfig(w_preload=2), ChainConfig(w_preload=1, preload_down=1),
                ChainConfig(programs=7, w_preload=2, preload_down=2)):
        got = mlp_chain(x, gu, dn, cfg, gemv_configs=cfgs)
        torch.cuda.synchronize()
        assert not barrier_timed_out(x.device), cfg
        assert torch.equal(got, want), (cfg, (got.float() - want.float()).abs().max().item())
    wg, wu = gu.dequantize(torch.float64).split(inter)
    x64 = x.double()
    ref = (torch.nn.functional.silu(x64 @ wg.T) * (x64 @ wu.T)) @ dn.dequantize(torch.float64).T
    assert ((want.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_engine_rule_takes_the_chain_at_batch_one() -> None:
    gu, dn = _weights("int4", 2048, 6144)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    assert mlp_chain_fits(x, gu, dn)
    assert not mlp_chain_fits(torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16), gu, dn)
    assert not mlp_chain_fits(x, *_weights("nvfp4", 2048, 6144))  # measured slower there


@pytest.mark.parametrize("dataflow,wpre,early", [(False, 0, False), (True, 0, False),
                                                  (True, 1, True), (True, 2, True)])
def test_graph_replays_rearm_the_barrier(dataflow: bool, wpre: int, early: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """8 chained launches a replay, with PDL as the engine runs them (pdl_scope), also with
    the first items' weights preloaded before the wait and every launch releasing the next
    before its own wait (pdl.EARLY_RELEASE): the same bits, no timeout, every word re-armed."""
    from orbit.kernels import pdl

    monkeypatch.setattr(pdl, "EARLY_RELEASE", early)
    gu, dn = _weights("int4", 2048, 6144)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    cfg = ChainConfig(dataflow=dataflow, w_preload=wpre, preload_down=1 if wpre > 1 else 0)
    want = mlp_chain(x, gu, dn, cfg)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), pdl.pdl_scope(True):
        mlp_chain(x, gu, dn, cfg)  # compile + occupancy outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ys = [mlp_chain(x, gu, dn, cfg) for _ in range(8)]  # 8 chained launches a replay
        for _ in range(50):
            graph.replay()
        torch.cuda.synchronize()
        words = barrier_words(x.device).tolist()
    torch.cuda.current_stream().wait_stream(stream)
    assert all(torch.equal(y, want) for y in ys)
    assert words[0] == 0 and words[2] == 0, words  # arrivals re-armed, no timeout
    assert not any(words[3:]), words  # the per-slice counters too


@pytest.mark.parametrize("fmt", ["int4"])  # (CHAIN_FORMATS: where the engine takes it)
def test_engine_bits_equal_with_and_without_chain(fmt: str) -> None:
    from gpu_models import bits, engine_on_off

    on, off = engine_on_off(fmt, "chain_mlp", 1, 6)
    assert bits(on) == bits(off)  # batch 1: every decode MLP is the chain, the same bits


def test_timeouts_are_taken_once() -> None:
    from orbit.kernels.grid_barrier import take_timeouts

    dev = torch.device("cuda")
    take_timeouts(dev)
    barrier_words(dev)[2] = 1  # what a program that gave up waiting leaves
    assert take_timeouts(dev) == 1  # Engine.generate raises on this
    assert take_timeouts(dev) == 0 and not barrier_timed_out(dev)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_chain_with_lora_matches_separate_launches(fmt: str) -> None:
    """Both GEMVs with their LoRA epilogues inside (h computed by the launch's shrink rows),
    persistent, barrier and dataflow forms, bit for bit the separate `gemv(..., lora=)`
    launches (gemv_chain.CHAIN_LORA gates only the engine's use of this)."""
    from orbit.kernels.lora_epilogue import LoRAEpilogue

    torch.manual_seed(5)
    hid, inter, r = 2048, 6144, 16
    gu, dn = _weights(fmt, hid, inter)
    x = torch.randn(1, hid, device="cuda", dtype=torch.bfloat16)
    a = [(torch.randn(r, k, device="cuda") * 0.05).bfloat16() for k in (hid, hid, inter)]
    b = [(torch.randn(n, r, device="cuda") * 0.05).bfloat16() for n in (inter, inter, hid)]

    def epis():
        nan = float("nan")
        return (LoRAEpilogue(torch.full((1, 2 * r), nan, device="cuda").bfloat16(),
                             (b[0], b[1]), 2.0, (a[0], a[1])),
                LoRAEpilogue(torch.full((1, r), nan, device="cuda").bfloat16(), (b[2],), 2.0,
                             (a[2],)))

    sms = gemv.num_sms(x.device)
    cfgs = (gemv.pick_gemv_config(1, 2 * inter, hid, fmt, sms),
            gemv.pick_gemv_config(1, hid, inter, fmt, sms))
    want = separate_mlp(x, gu, dn, cfgs, lora=epis())
    assert not want.isnan().any() and not torch.equal(want, separate_mlp(x, gu, dn, cfgs))
    for cfg in (ChainConfig(), ChainConfig(dataflow=False), ChainConfig(programs=7)):
        got = mlp_chain(x, gu, dn, cfg, gemv_configs=cfgs, lora=epis())
        torch.cuda.synchronize()
        assert not barrier_timed_out(x.device), cfg
        assert torch.equal(got, want), cfg
    assert not any(barrier_words(x.device)[3:].tolist())  # every counter re-armed


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_engine_bits_equal_with_preload_and_early_release(fmt: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode GEMVs' (and the chain's) weight preload before the PDL wait, with every PDL
    launch releasing the next before its own wait: the engine samples the same tokens with the
    same log-probs as without (both only move loads of frozen weights and launch times)."""
    from gpu_models import bits, mixed_prompts, run_engine, small_qwen3

    from orbit.kernels import pdl
    from orbit.rollout.types import SamplingParams

    model = small_qwen3(fmt)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, ignore_eos=True, seed=3)
    ps = mixed_prompts(8)
    _, off = run_engine(model, ps, sp, 1)
    monkeypatch.setattr(gemv, "PDL_W_PRELOAD", 2)
    monkeypatch.setattr(pdl, "EARLY_RELEASE", True)
    _, on = run_engine(model, ps, sp, 1)
    assert bits(on) == bits(off)
