"""Batched sampling: counter-based randomness, truncation masks, log-probs, frequencies."""

from __future__ import annotations

import math

import torch

from orbit.models.logprobs import logprobs_from_logits
from orbit.rollout.sampling import (
    counter_uniform,
    counter_uniform_py,
    make_batch,
    sample,
    sequence_key,
)
from orbit.rollout.types import SamplingParams


def _batch(params: list[SamplingParams], keys: list[int], steps: list[int], V: int):
    return make_batch(params, keys, steps, V, "cpu")


def test_counter_uniform_matches_host_twin_and_is_uniform() -> None:
    keys = [sequence_key(s, r, j) for s in (0, 1, 2**40 + 3) for r in range(20) for j in range(5)]
    steps = list(range(len(keys)))
    u = counter_uniform(torch.tensor(keys), torch.tensor(steps))
    ref = torch.tensor([counter_uniform_py(k, s) for k, s in zip(keys, steps)], dtype=torch.float32)
    assert torch.equal(u, ref)
    big = counter_uniform(torch.full((200_000,), sequence_key(7, 0, 0)), torch.arange(200_000))
    assert 0.0 < big.min() and big.max() < 1.0
    hist = torch.histc(big, bins=10, min=0, max=1) / big.numel()
    assert (hist - 0.1).abs().max() < 0.005, hist
    assert len(set(keys)) == len(keys)


def test_sampling_frequencies_follow_the_distribution() -> None:
    torch.manual_seed(0)
    V, N = 6, 40_000
    logits = torch.randn(1, V).repeat(N, 1)
    p = SamplingParams(temperature=0.8)
    b = _batch([p] * N, [sequence_key(1, i, 0) for i in range(N)], [0] * N, V)
    tok, lp = sample(logits, b)
    freq = torch.bincount(tok, minlength=V).float() / N
    want = torch.softmax(logits[0] / 0.8, -1)
    assert (freq - want).abs().max() < 0.01, (freq, want)
    ref, _ = logprobs_from_logits(logits, tok, 0.8)
    assert torch.equal(lp, ref)  # untruncated "processed" is the trainer's function


def test_truncation_keeps_the_right_tokens_and_renormalises() -> None:
    V, N = 8, 20_000
    probs = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])
    logits = probs.log()[None].repeat(N, 1)
    keys = [sequence_key(3, i, 0) for i in range(N)]
    cases = [
        (SamplingParams(top_k=3), {0, 1, 2}),
        (SamplingParams(top_p=0.6), {0, 1, 2}),  # 0.30 + 0.25 < 0.6: the third is needed
        (SamplingParams(min_p=0.4), {0, 1, 2}),  # >= 0.12
        (SamplingParams(top_k=5, top_p=0.95, min_p=0.3), {0, 1, 2, 3}),
    ]
    for p, allowed in cases:
        tok, lp = sample(logits, _batch([p] * N, keys, [0] * N, V))
        assert set(tok.tolist()) == allowed, (p, set(tok.tolist()))
        mass = probs[sorted(allowed)].sum()
        want = (probs[tok] / mass).log()
        assert torch.allclose(lp, want, atol=1e-5), p
        freq = torch.bincount(tok, minlength=V).float() / N
        assert (freq[sorted(allowed)] - probs[sorted(allowed)] / mass).abs().max() < 0.015


def test_logprob_modes_and_greedy() -> None:
    torch.manual_seed(1)
    V = 50
    logits = torch.randn(4, V) * 3
    logits[3] = logits[2]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs_mode="scaled"),
        SamplingParams(temperature=0.5, top_k=5, logprobs_mode="scaled"),
        SamplingParams(temperature=0.5, top_k=5, logprobs_mode="raw"),
    ]
    tok, lp = sample(logits, _batch(params, [1, 2, 3, 3], [0, 0, 0, 0], V))
    assert tok[0] == logits[0].argmax() and tok[1] == logits[1].argmax()
    assert tok[2] == tok[3]  # same key and step, same logits row content
    assert lp[0] == 0.0  # processed greedy: a point mass
    full1, _ = logprobs_from_logits(logits, tok, 1.0)
    half, _ = logprobs_from_logits(logits, tok, 0.5)
    assert lp[1] == full1[1] and lp[2] == half[2] and lp[3] == full1[3]


def test_row_result_does_not_depend_on_batch_mates() -> None:
    torch.manual_seed(2)
    V = 100
    row = torch.randn(1, V)
    p = SamplingParams(temperature=1.0, seed=5)
    alone, lp_alone = sample(row, _batch([p], [11], [4], V))
    others = torch.randn(3, V)
    mates = [SamplingParams(top_p=0.5), SamplingParams(temperature=0.0), SamplingParams(min_p=0.1)]
    mixed, lp_mixed = sample(torch.cat([others, row]), _batch(mates + [p], [1, 2, 3, 11], [0, 1, 2, 4], V))
    assert mixed[3] == alone[0] and math.isclose(lp_mixed[3].item(), lp_alone[0].item(), abs_tol=1e-6)


def test_row_cdf_matches_cumsum() -> None:
    from orbit.rollout.sampling import row_cdf

    g = torch.Generator().manual_seed(0)
    for V in (7, 512, 1000, 151936 // 16):
        p = torch.softmax(torch.randn(5, V, generator=g) * 4, -1)
        p[1, : V // 2] = 0  # zero-probability stretches stay flat
        cdf = row_cdf(p, blocked=True)
        ref = p.double().cumsum(-1)
        assert cdf.shape == p.shape
        assert torch.allclose(cdf.double(), ref, atol=1e-6), V
        assert torch.equal(row_cdf(p[2:3], blocked=True), cdf[2:3])
        assert torch.equal(row_cdf(p), p.cumsum(-1))  # CPU default: the plain scan  # a row does not depend on the batch


def test_fused_logprobs_only_where_the_kernel_samples_at_the_logprob_temperature(monkeypatch) -> None:
    """`sample(..., fused_logprobs=True)` (the engine's fast mode) takes the log-probs from the
    sampler kernel only when no row truncates and every row's log-prob is at its sampling
    temperature; a processed greedy row still reports 0. (The kernel itself: tests/unit/
    test_kernels_sample.py; here its routing, with a stand-in that records the call.)"""
    import orbit.rollout.sampling as smod

    calls = []

    def fake(logits, t, keys, steps=None, logprobs=False):
        calls.append(logprobs)
        tok = logits.argmax(-1)
        return (tok, torch.full((logits.shape[0],), -0.5)) if logprobs else tok

    monkeypatch.setattr(smod, "sample_rows_available", lambda logits: True)
    monkeypatch.setattr(smod, "sample_rows_triton", fake)
    logits = torch.randn(3, 11)

    def run(*params):
        calls.clear()
        b = make_batch(list(params), [1, 2, 3][:len(params)], [0] * len(params), 11, "cpu")
        return sample(logits[:len(params)], b, fused_logprobs=True)[1], list(calls)

    lp, c = run(SamplingParams(temperature=0.7, logprobs_mode="scaled"),
                SamplingParams(temperature=0.0, logprobs_mode="processed"),
                SamplingParams(temperature=1.0, logprobs_mode="raw"))
    assert c == [True] and lp.tolist() == [-0.5, 0.0, -0.5]  # processed greedy: 0
    _, c = run(SamplingParams(temperature=0.7, logprobs_mode="raw"))  # lp at T = 1, samples at 0.7
    assert c == [False]  # the kernel samples; the log-prob is the trainer function's
    _, c = run(SamplingParams(temperature=0.7, top_p=0.9))  # truncation: the torch path
    assert c == []
    _, c = run(SamplingParams(temperature=0.0))  # all greedy: argmax, no kernel
    assert c == []
    b = make_batch([SamplingParams(temperature=0.7)], [1], [0], 11, "cpu")
    calls.clear()
    sample(logits[:1], b)  # fused_logprobs off (exact mode): the trainer's function
    assert calls == [False]


def test_params_take_a_lone_stop_string_or_id_and_tiny_temperatures_are_greedy() -> None:
    p = SamplingParams(stop_strings="VZ", stop_token_ids=5)
    assert p.stop_strings == ("VZ",) and p.stop_token_ids == (5,)  # not ('V', 'Z')
    p.check(vocab_size=10)
    import pytest

    with pytest.raises(ValueError, match="stop_token_ids must be a list"):
        SamplingParams(stop_token_ids=5.5).check()
    for t in (0.0, 1e-40, 1e-6):
        assert SamplingParams(temperature=t).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    logits = torch.randn(2, 13)
    b = _batch([SamplingParams(temperature=1e-40, logprobs_mode="scaled")] * 2, [1, 2], [0, 0], 13)
    tok, lp = sample(logits, b)
    assert torch.equal(tok, logits.argmax(-1)) and lp.isfinite().all()
    assert b.temperature.tolist() == [0.0, 0.0]  # greedy on the device too


def test_numpy_integer_seeds_are_plain_ints() -> None:
    import numpy as np

    for t in (np.int8, np.int16, np.int32, np.uint16, np.int64):
        p = SamplingParams(seed=t(7))
        assert type(p.seed) is int and p.seed == 7
        assert sequence_key(p.seed, 0, 1) == sequence_key(7, 0, 1)
