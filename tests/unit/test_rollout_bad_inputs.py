"""Bad requests to the native engine: clear messages naming what was passed, and with
on_error="skip" one bad request does not fail the others of its batch (tiny random model, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine, token_ids
from orbit.rollout.types import SamplingParams

V = 97
GOOD = [7, 8, 9]
SP = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="LlamaForCausalLM", vocab_size=V, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    return Engine(CausalLM(cfg).eval(), max_num_seqs=4, max_model_len=16)


@pytest.mark.parametrize("prompt, match", [
    ("hello", r"request 1: prompt must be a list of token ids \(ints\), got str 'hello'; tokenize it first"),
    (b"hi", r"request 1: prompt must be a list of token ids \(ints\), got bytes"),
    (torch.tensor([1.0, 2.0]), r"request 1: prompt must hold integer token ids, got a torch.float32 tensor"),
    (torch.tensor([[1, 2]]), (r"request 1: prompt must be a 1-D tensor of token ids, "
                              r"got shape \(1, 2\); pass one row per prompt")),
    (torch.tensor(3), r"request 1: prompt must be a 1-D tensor of token ids, got shape \(\)"),
    (5, r"request 1: prompt must be a list of token ids \(ints\), got int; generate takes a list of prompts"),
    (None, r"request 1: prompt must be a list of token ids \(ints\), got NoneType"),
    ([1, 2.0], r"request 1: prompt must be a list of token ids \(ints\), it holds 2.0 \(float\)"),
    ([1, True], r"request 1: prompt must be a list of token ids \(ints\), it holds True \(bool\)"),
    ([], r"request 1: prompt is empty"),
])
def test_prompt_type_errors_say_what_was_passed(engine: Engine, prompt, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        engine.generate([GOOD, prompt], SP)


def test_prompts_itself_must_be_a_list(engine: Engine) -> None:
    with pytest.raises(ValueError, match="prompts must be a list of prompts .*got str"):
        engine.generate("hello", SP)


def test_integer_tensor_prompts_are_accepted(engine: Engine) -> None:
    ref = engine.generate([GOOD], SP)[0][0].tokens
    for p in (torch.tensor(GOOD), torch.tensor(GOOD, dtype=torch.int32), (7, 8, 9),
              [np.int64(7), np.int64(8), np.int64(9)]):
        assert engine.generate([p], SP)[0][0].tokens == ref, p
    batch = torch.tensor([GOOD, GOOD])  # a 2-D tensor is a list of 1-D prompts
    assert [r[0].tokens for r in engine.generate(batch, SP)] == [ref, ref]
    assert token_ids(torch.tensor([3, 4])) == [3, 4] and type(token_ids((np.int32(3),))[0]) is int


def test_skip_returns_each_bad_request_as_an_error_and_runs_the_rest(engine: Engine) -> None:
    ref = engine.generate([GOOD], SP, n=2)[0]
    bad = ["text", [], [1] * 16, [1, V], torch.tensor([0.5])]
    out = engine.generate([GOOD, *bad, GOOD], SP, n=2, on_error="skip")
    assert len(out) == len(bad) + 2 and all(len(r) == 2 for r in out)
    assert [c.tokens for c in out[0]] == [c.tokens for c in ref] == [c.tokens for c in out[-1]]
    for i, row in enumerate(out[1:-1], start=1):
        for c in row:
            assert c.finish_reason == "error" and c.tokens == [] and c.logprobs == []
            assert c.error.startswith(f"request {i}: "), c.error
    assert "got str" in out[1][0].error and "empty" in out[2][0].error
    assert "16 tokens" in out[3][0].error and f"holds {V}" in out[4][0].error
    # per-request sampling values are per-request errors too
    out = engine.generate([GOOD, GOOD], [SP, SamplingParams(temperature=True)], on_error="skip")
    assert out[0][0].finish_reason == "length" and "temperature" in out[1][0].error
    # the whole call's own arguments still raise in skip mode
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        engine.generate([GOOD], SP, n=0, on_error="skip")
    with pytest.raises(ValueError, match="n must be an int >= 1, got True"):
        engine.generate([GOOD], SP, n=True, on_error="skip")


def test_every_request_bad_in_skip_mode(engine: Engine) -> None:
    out = engine.generate([[], "x"], SP, n=3, on_error="skip")
    assert [[c.finish_reason for c in r] for r in out] == [["error"] * 3] * 2


@pytest.mark.parametrize("field, value", [
    ("temperature", True), ("temperature", False), ("top_p", True), ("top_k", False), ("top_k", True),
    ("min_p", False), ("max_new_tokens", True), ("seed", True), ("seed", False),
])
def test_sampling_params_reject_bools(field: str, value: bool) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be .*got {value!r}$"):
        SamplingParams(**{field: value}).check()


def test_sampling_params_reject_bool_stop_token_and_ignore_eos() -> None:
    with pytest.raises(ValueError, match="stop_token_ids holds True"):
        SamplingParams(stop_token_ids=(True,)).check(V)
    with pytest.raises(ValueError, match="ignore_eos must be a bool, got 1"):
        SamplingParams(ignore_eos=1).check()


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_sampling_params_reject_non_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be .*got {value!r}$"):
        SamplingParams(**{field: value}).check()


def test_sampling_params_accept_numpy_scalars_and_edges() -> None:
    SamplingParams(temperature=np.float32(0.5), top_p=np.float64(1.0), top_k=np.int64(5),
                   min_p=np.float32(0.1), max_new_tokens=np.int64(4), seed=np.int64(0)).check(V)
    SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=0, max_new_tokens=1).check(V)
