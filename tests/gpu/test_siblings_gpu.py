"""Sibling groups (orbit.quant.siblings) on CUDA: the engine's default stacks q/k/v and gate/up;
graph-replayed decode through the grouped GEMVs gives the tokens and log-probs of the separate
launches (fast mode: same weights, a different split-K sum order, so close, not bit-equal),
and exact mode never takes the grouped path (engine == trainer stays bit for bit)."""

from __future__ import annotations

import pytest
import torch
from gpu_models import V, bits, mixed_prompts, run_engine, small_qwen3

from orbit.kernels import dispatch
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fmt", ["int4", "fp8", "mxfp4"])
def test_engine_grouped_decode_matches_separate(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(2, V, (n,), generator=g).tolist() for n in (7, 30, 1, 12)]
    # (k/v are 128 wide: FP8's 128-row scale blocks stack only whole)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, logprobs_mode="raw")
    sep = Engine(small_qwen3(fmt), max_num_seqs=4, max_model_len=64, fuse_siblings=False).generate(ps, sp)
    calls: list[int] = []
    # (the stacked gate/up forward goes through qmm_swiglu where its kernel stores SwiGLU)
    for name in ("qmm", "qmm_swiglu"):
        orig = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda x, qw, *a, _f=orig, **kw: (
            calls.append(qw.shape[0]), _f(x, qw, *a, **kw))[1])
    eng = Engine(small_qwen3(fmt), max_num_seqs=4, max_model_len=64)
    assert eng.sibling_groups == 2 * 3
    out = eng.generate(ps, sp)
    # The stacked gate/up launch (1024 rows; stacked q/k/v has 512, as gate_proj alone does).
    # Python runs the forward only when a decode graph is captured, so calls are not per step.
    assert 2 * 512 in calls
    agree = total = 0
    for rs, ro in zip(sep, out):
        a, b = rs[0], ro[0]
        n = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
        agree += n
        total += len(a.tokens)
        if n:  # the shared prefix: log-probs within bf16 fast-mode tolerance
            d = (torch.tensor(a.logprobs[:n]) - torch.tensor(b.logprobs[:n])).abs().max()
            assert d < 0.05, (fmt, float(d))
    assert agree >= 0.75 * total, (fmt, agree, total)  # greedy paths split only at near-ties


def test_exact_mode_does_not_group(monkeypatch: pytest.MonkeyPatch) -> None:
    from orbit.alignment.exact import convert_exact

    model = small_qwen3("int4")
    convert_exact(model)
    eng = Engine(model, max_num_seqs=2, max_model_len=64, exact=True)
    assert eng.sibling_groups == 2 * 3  # linked, but exact calls never take the grouped path
    calls: list[int] = []
    orig = dispatch.qmm
    monkeypatch.setattr(dispatch, "qmm", lambda x, qw, *a, **kw: (calls.append(qw.shape[0]),
                                                                    orig(x, qw, *a, **kw))[1])
    eng.generate([[3, 4, 5]], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    assert calls and 2 * 512 not in calls and calls[:3] == [256, 128, 128]


@pytest.mark.parametrize("fmt", ["int4", "fp8", "bf16"])
def test_pdl_decode_gives_the_same_bits(fmt: str) -> None:
    """Engine(pdl=True) (programmatic dependent launch of the decode kernels, graphs on) is
    scheduling only: the same tokens and log-prob bits as pdl=False, at batch 1 and 4."""
    from orbit.kernels.pdl import pdl_available

    if not pdl_available(torch.device("cuda")):
        pytest.skip("PDL needs sm_90+ and Triton with griddepcontrol")
    model = small_qwen3(fmt)
    ps = mixed_prompts(3)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=7, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for pdl in (False, True):
            eng, out = run_engine(model, ps, sp, batch, pdl=pdl)
            assert eng.pdl is pdl
            outs.append(bits(out))
        assert outs[0] == outs[1], (fmt, batch)


@pytest.mark.parametrize("fmt", ["int4", "bf16"])
def test_fused_qk_rope_cache_write_gives_the_same_bits(fmt: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode/prefill forward's one-launch q/k norm + RoPE + K/V cache write
    (orbit.kernels.rope.qk_norm_rope_kv) gives the tokens and log-prob bits of the separate
    norm_rope and kv_write launches, at batch 1 and 4, graphs on."""
    import orbit.models.transformer as tf
    from orbit.kernels import rope

    model = small_qwen3(fmt)
    ps = mixed_prompts(5)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=11, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for fused in (False, True):
            calls: list[int] = []

            def available(*a, fused=fused):
                return fused and rope.qk_norm_rope_kv_available(*a)

            def launch(*a, calls=calls, **kw):  # (kw: the L2 prefetch table)
                calls.append(1)
                return rope.qk_norm_rope_kv(*a, **kw)

            monkeypatch.setattr(tf, "qk_norm_rope_kv_available", available)
            monkeypatch.setattr(tf, "qk_norm_rope_kv", launch)
            outs.append(bits(run_engine(model, ps, sp, batch)[1]))
            assert bool(calls) is fused
        assert outs[0] == outs[1], (fmt, batch)
