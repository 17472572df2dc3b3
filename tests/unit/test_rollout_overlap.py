"""Overlapped decode (Engine(overlap=True)): step t+1 is launched from step t's sampled tokens
on the device before the host reads them. On a tiny random model (CPU, float32) every
completion must equal the one of the same engine without overlap (same tokens and finish
reasons, log-probs up to batch-shape rounding), across every way a sequence ends (stop token, stop string, max_new_tokens,
the context limit), n samples per prompt, and more requests than slots; and the overlap must
actually have happened (a test that never overlaps would pass trivially)."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen3 import VOCAB as V
from tiny_qwen3 import tiny_qwen3

from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return tiny_qwen3(lm_scale=3.0)


def _decode(ids: list[int]) -> str:
    return "".join(chr(97 + t % 26) for t in ids)


def _prompts(k: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(6, V, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 14, (k,), generator=g)]


def _both(model: CausalLM, prompts, sampling, n: int = 1, **kw):
    runs = []
    for overlap in (False, True):
        eng = Engine(model, tokenizer=_decode, overlap=overlap, **kw)
        runs.append((eng.generate(prompts, sampling, n=n), eng.last_stats))
    return runs


def _same(a, b) -> None:
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            assert ca.tokens == cb.tokens
            assert ca.finish_reason == cb.finish_reason
            # A discarded row (a sequence that stopped a step earlier) makes that step's batch
            # one row wider than without overlap: batch-shape rounding, not a different value.
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)


def test_overlap_same_completions_every_finish_reason(model: CausalLM) -> None:
    prompts = _prompts(9)
    # Per request: stop tokens that fire early, a stop string, different lengths, EOS on.
    sampling = [SamplingParams(temperature=1.0, max_new_tokens=4 + 3 * i, seed=i,
                               stop_token_ids=[7, 11, 13] if i % 3 == 0 else [],
                               stop_strings=["ab"] if i % 3 == 1 else [])
                for i in range(len(prompts))]
    (a, sa), (b, sb) = _both(model, prompts, sampling, n=2, max_num_seqs=4, max_model_len=40)
    _same(a, b)
    reasons = {c.finish_reason for row in b for c in row}
    assert {"stop", "length"} <= reasons, reasons
    assert sa["overlapped_steps"] == 0 and sb["overlapped_steps"] > 0
    assert sa["new_tokens"] == sb["new_tokens"]


def test_overlap_same_completions_at_the_context_limit(model: CausalLM) -> None:
    prompts = _prompts(5, seed=8)
    sp = SamplingParams(temperature=0.8, max_new_tokens=64, seed=2, ignore_eos=True)
    (a, _), (b, sb) = _both(model, prompts, sp, max_num_seqs=2, max_model_len=24)
    _same(a, b)
    assert all(len(p) + len(row[0].tokens) == 24 for p, row in zip(prompts, b))
    assert sb["overlapped_steps"] > 0


def test_overlap_greedy_stop_tokens_end_mid_batch(model: CausalLM) -> None:
    """Greedy rows that stop at different steps: each stop leaves a discarded row in the
    overlapped step after it, and the batch shrinks."""
    prompts = _prompts(6, seed=5)
    stops = list(range(6, V, 4))  # a quarter of the vocabulary stops
    sp = SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=stops)
    (a, _), (b, sb) = _both(model, prompts, sp, max_num_seqs=6, max_model_len=64)
    _same(a, b)
    lengths = {len(row[0].tokens) for row in b}
    assert len(lengths) > 1, lengths  # they did end at different steps
    assert sb["overlapped_steps"] > 0


def test_overlap_moe_model(model: CausalLM) -> None:
    """An MoE model (eager decode: its routing reads the host, so no CUDA graphs) overlaps
    through the eager input path: same completions as the synchronous loop."""
    from test_models_moe_logprobs import tiny as tiny_moe

    moe = tiny_moe().eval()
    prompts = [p[:8] for p in _prompts(4, seed=6)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, stop_token_ids=[7, 11])
    (a, _), (b, sb) = _both(moe, [[t % 89 for t in p] for p in prompts], sp, max_num_seqs=3,
                            max_model_len=48)
    _same(a, b)
    assert sb["overlapped_steps"] > 0
