"""Mismatch metrics, the measurement on the real engine + trainer path, the conventional
baseline, the MismatchMonitor and the preflight gate (CPU, tiny random models)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from orbit.alignment.measure import measure_mismatch, mismatch_metrics, random_prompts, score_packed
from orbit.alignment.monitor import MismatchMonitor
from orbit.alignment.variants import build_conventional, build_variant, random_model
from orbit.data.sample import Sample
from orbit.entrypoints.preflight import check_bounds
from orbit.entrypoints.preflight import main as preflight_main
from orbit.models.config import ModelConfig
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

CFG = ModelConfig(arch="LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16, max_position_embeddings=256)


def test_mismatch_metrics_values() -> None:
    t = [-1.0, -2.0, -0.5, -3.0]
    r = [-1.0, -2.5, -0.5, -2.0]
    m = mismatch_metrics(t, r)
    d = torch.tensor(t, dtype=torch.float64) - torch.tensor(r, dtype=torch.float64)
    assert m.n_tokens == 4 and m.frac_diff == 0.5
    assert m.mean_abs == pytest.approx(0.375) and m.max_abs == pytest.approx(1.0)
    assert m.kl_k1 == pytest.approx(float((-d).mean()))
    assert m.kl_k3 == pytest.approx(float((d.exp() - 1 - d).mean()))
    assert m.kl_k3 > 0
    z = mismatch_metrics(t, t)
    assert (z.mean_abs, z.max_abs, z.frac_diff, z.kl_k1, z.kl_k3) == (0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="lp_rollout"):
        mismatch_metrics([0.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="no tokens"):
        mismatch_metrics([], [])


def test_score_packed_matches_per_sequence_forward() -> None:
    model = random_model(CFG, "cpu", torch.float32, seed=1)
    samples = [Sample(prompt_ids=[3, 4, 5], response_ids=[6, 7]), Sample(prompt_ids=[9], response_ids=[1, 2, 8])]
    lp = score_packed(model, samples)
    assert [len(x) for x in lp] == [2, 3]
    # one sequence alone, full log-softmax by hand
    from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths

    seq = [9, 1, 2, 8]
    with torch.no_grad():
        h = model(torch.tensor(seq), torch.arange(4), AttnBatch.packed(cu_seqlens_from_lengths([4])))
        logp = torch.log_softmax(model.logits(h), -1)
    want = [logp[i, seq[i + 1]].item() for i in range(3)]
    assert lp[1] == pytest.approx(want, abs=1e-5)


def test_fast_mode_gap_is_small_and_conventional_is_larger() -> None:
    base = random_model(CFG, "cpu", torch.float32, seed=2)
    prompts = random_prompts(2, CFG.vocab_size, seed=3)
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=4, ignore_eos=True)
    model, _ = build_variant(base, "int4", "lora", "fast", group_size=32)
    orbit = measure_mismatch(model, Engine(model, max_num_seqs=4, max_model_len=64), prompts, sp, n=2).metrics
    trainer, rollout, _ = build_conventional(base, "int4", "lora", group_size=32)
    conv = measure_mismatch(rollout, Engine(rollout, max_num_seqs=4, max_model_len=64), prompts, sp, n=2,
                            train_model=trainer).metrics
    assert orbit.n_tokens == conv.n_tokens == 2 * 2 * 8
    assert orbit.max_abs < 1e-2  # float32 rounding only
    assert conv.mean_abs > 100 * orbit.mean_abs  # int4 vs bf16 weights: a real distribution gap
    assert conv.kl_k3 > 0
    with pytest.raises(ValueError, match="temperature"):
        measure_mismatch(model, Engine(model, max_num_seqs=4, max_model_len=64), prompts,
                         SamplingParams(temperature=0.0, max_new_tokens=2))


def test_monitor_warns_on_jump_only(caplog: pytest.LogCaptureFixture) -> None:
    mon = MismatchMonitor(factor=5.0, floors={"mean_abs": 1e-3}, min_history=3)
    for step, v in enumerate([2e-3, 2.2e-3, 1.9e-3, 2.1e-3, 4e-3]):
        assert mon.update(step, {"mean_abs": v}) == []  # noise and a 2x drift: no warning
    with caplog.at_level(logging.WARNING, logger="orbit.alignment.monitor"):
        jumps = mon.update(5, {"mean_abs": 5e-2, "other": 1.0})
    assert len(jumps) == 1 and jumps[0].step == 5 and jumps[0].metric == "mean_abs"
    assert jumps[0].ratio == pytest.approx(5e-2 / 2.1e-3, rel=1e-6)
    assert "step 5" in caplog.text and "mean_abs" in caplog.text
    # below the absolute floor nothing is a jump, however large the ratio
    tiny = MismatchMonitor(floors={"mean_abs": 1e-3})
    for step, v in enumerate([1e-8, 1e-8, 1e-8, 5e-4]):
        assert tiny.update(step, {"mean_abs": v}) == []
    assert MismatchMonitor().update(0, {"kl_k3": math.nan})[0].metric == "kl_k3"
    ex = MismatchMonitor(exact=True)
    assert ex.update(0, {"max_abs": 0.0}) == [] and len(ex.update(1, {"max_abs": 1e-7})) == 1
    with pytest.raises(ValueError, match="factor"):
        MismatchMonitor(factor=1.0)


def test_check_bounds() -> None:
    zero = mismatch_metrics([-1.0, -2.0], [-1.0, -2.0])
    small = mismatch_metrics([-1.0, -2.0], [-1.0, -2.0 + 1e-6])
    big = mismatch_metrics([-1.0, -2.0], [-1.5, -3.0])
    assert check_bounds(zero, "exact")[0] and not check_bounds(small, "exact")[0]
    assert "bitwise" in check_bounds(small, "exact")[1]
    assert check_bounds(small, "fast")[0]
    ok, msg = check_bounds(big, "fast")
    assert not ok and "mean |dlogp|" in msg
    with pytest.raises(ValueError, match="mode"):
        check_bounds(zero, "turbo")


def test_preflight_cli(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--preflight-random-model", "tiny", "--preflight-prompts", "2", "--preflight-samples", "1",
              "--preflight-max-new-tokens", "6", "--quant-group-size", "32", "--device", "cpu"]
    assert preflight_main(common + ["--quant-format", "int4", "--precision-mode", "exact"]) == 0
    out = capsys.readouterr().out
    assert "OK: exact mode" in out and "tokens=12" in out
    # fast mode with an impossible bound fails with a clear message and a non-zero status
    assert preflight_main(common + ["--adapter", "oft", "--oft-block-size", "16",
                                    "--preflight-mean-abs-bound", "0", "--preflight-kl-bound", "-1"]) == 1
    assert "FAIL: fast mode mismatch over its bound" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--preflight-prompts"):
        preflight_main(common + ["--preflight-prompts", "0"])
