"""The native engine against naive references on a tiny random model (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen3 import VOCAB as V
from tiny_qwen3 import tiny_qwen3

from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.config import ModelConfig
from orbit.models.logprobs import token_logprobs
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return tiny_qwen3(lm_scale=8.0)  # sharper distributions than the default init


def _packed_hidden(model: CausalLM, seqs: list[list[int]]) -> torch.Tensor:
    lens = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        return model(ids, positions_from_lengths(lens), AttnBatch.packed(cu_seqlens_from_lengths(lens)))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(6, V, (n,), generator=g).tolist() for n in (5, 1, 12, 3, 8)]


def test_greedy_equals_naive_full_recompute(model: CausalLM) -> None:
    prompts = _prompts()
    eng = Engine(model, max_num_seqs=3, max_model_len=64)
    out = eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True))
    for p, (c,) in zip(prompts, out):
        seq = list(p)
        for _ in range(12):
            h = _packed_hidden(model, [seq])
            seq.append(int(model.logits(h[-1:]).argmax()))
        assert c.tokens == seq[len(p):] and c.finish_reason == "length"
        assert c.logprobs == [0.0] * 12  # processed greedy: a point mass


@pytest.mark.parametrize("mode, top_k", [("scaled", 0), ("processed", 0), ("scaled", 10)])
def test_logprobs_match_packed_forward(model: CausalLM, mode: str, top_k: int) -> None:
    prompts = _prompts()
    sp = SamplingParams(temperature=0.7, top_k=top_k, max_new_tokens=10, seed=1, logprobs_mode=mode)
    out = Engine(model, max_num_seqs=4, max_model_len=64).generate(prompts, sp, n=2)
    for p, row in zip(prompts, out):
        for c in row:
            full = p + c.tokens
            h = _packed_hidden(model, [full])
            ref = token_logprobs(model, h[len(p) - 1 : -1], torch.tensor(c.tokens), temperature=0.7)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=2e-5, rtol=0), (mode, c.logprobs, ref)


def test_n_samples_share_one_prefill(model: CausalLM) -> None:
    prompt = _prompts()[2]
    seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        eng = Engine(model, max_num_seqs=8, max_model_len=64)
        (row,) = eng.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True, seed=0), n=4)
    finally:
        hook.remove()
    assert seen[0] == len(prompt) and seen[1:] == [4] * 5  # one prefill, then 4-row decodes
    assert eng.last_stats["prefill_steps"] == 1
    assert len({tuple(c.tokens) for c in row}) > 1  # different randomness per sample
    # every sample continues the same prompt KV: each matches a fresh single-sample run
    for j, c in enumerate(row):
        h = _packed_hidden(model, [prompt + c.tokens])
        ref = token_logprobs(model, h[len(prompt) - 1 : -1], torch.tensor(c.tokens))
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=2e-5, rtol=0), j


def test_seed_reproducible_and_independent_of_batching(model: CausalLM) -> None:
    prompts = _prompts()
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=123)
    a = Engine(model, max_num_seqs=2, max_model_len=64).generate(prompts, sp, n=3)
    b = Engine(model, max_num_seqs=16, max_model_len=64).generate(prompts, sp, n=3)
    c = Engine(model, max_num_seqs=2, max_model_len=64).generate(
        prompts, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=124), n=3)
    tok = lambda out: [[x.tokens for x in row] for row in out]  # noqa: E731
    assert tok(a) == tok(b)
    assert tok(a) != tok(c)
    # a seeded request's samples do not depend on where it sits in the prompt list
    moved = Engine(model, max_num_seqs=4, max_model_len=64).generate(prompts[::-1], sp, n=3)
    assert tok(moved) == tok(a)[::-1]
    unseeded = Engine(model, max_num_seqs=4, max_model_len=64, seed=9)
    d1 = unseeded.generate(prompts, SamplingParams(max_new_tokens=8))
    d2 = unseeded.generate(prompts, SamplingParams(max_new_tokens=8))
    assert tok(d1) != tok(d2)  # fresh seeds per call


def test_finish_reasons_stop_token_string_length(model: CausalLM) -> None:
    prompt = _prompts()[0]
    eng = Engine(model, max_num_seqs=4, max_model_len=64, tokenizer=lambda ids: " ".join(map(str, ids)))
    base = SamplingParams(temperature=1.0, max_new_tokens=12, seed=4, ignore_eos=True)
    (ref,) = eng.generate([prompt], base)[0]
    assert ref.finish_reason == "length" and len(ref.tokens) == 12 and ref.text == " ".join(map(str, ref.tokens))
    stop_tok = ref.tokens[4]
    first = ref.tokens.index(stop_tok)
    (c,) = eng.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=12, seed=4,
                                                 stop_token_ids=(stop_tok,)))[0]
    assert c.finish_reason == "stop" and c.tokens == ref.tokens[: first + 1]
    s = f"{ref.tokens[5]} {ref.tokens[6]}"
    (c,) = eng.generate([prompt], SamplingParams(temperature=1.0, max_new_tokens=12, seed=4,
                                                 ignore_eos=True, stop_strings=(s,)))[0]
    assert c.finish_reason == "stop_string" and s in c.text and c.tokens == ref.tokens[: len(c.tokens)]
    assert len(c.tokens) <= 7
    # the context limit ends a sequence with "length" too
    short = Engine(model, max_num_seqs=2, max_model_len=len(prompt) + 3)
    (c,) = short.generate([prompt], base)[0]
    assert c.finish_reason == "length" and len(c.tokens) == 3


def test_eos_stops_unless_ignored(model: CausalLM) -> None:
    prompts = _prompts() * 4
    eng = Engine(model, max_num_seqs=8, max_model_len=64, eos_token_ids=[int(t) for t in range(40)])
    out = eng.generate(prompts, SamplingParams(max_new_tokens=20, seed=0))
    assert any(c.finish_reason == "stop" and c.tokens[-1] < 40 for row in out for c in row)
    for row in out:
        for c in row:
            assert all(t >= 40 for t in c.tokens[:-1])


def test_continuous_batching_more_requests_than_slots(model: CausalLM) -> None:
    prompts = _prompts() * 3  # 15 requests x 2 samples through 3 slots
    sp = SamplingParams(max_new_tokens=7, seed=8, stop_token_ids=(50, 60, 70))
    eng = Engine(model, max_num_seqs=3, max_model_len=64)
    out = eng.generate(prompts, sp, n=2)
    wide = Engine(model, max_num_seqs=64, max_model_len=64).generate(prompts, sp, n=2)
    assert [[c.tokens for c in r] for r in out] == [[c.tokens for c in r] for r in wide]
    assert all(1 <= len(c.tokens) <= 7 for r in out for c in r)
    assert eng.last_stats["prefill_steps"] >= 10  # slots were handed over many times
    assert eng.cache is not None and eng.num_slots == 3


def test_bad_inputs(model: CausalLM) -> None:
    eng = Engine(model, max_num_seqs=2, max_model_len=16)
    good = [1, 2, 3]
    sp = SamplingParams(max_new_tokens=3, seed=0)
    with pytest.raises(ValueError, match="request 1: prompt is empty"):
        eng.generate([good, []], sp)
    with pytest.raises(ValueError, match="request 0: prompt has 16 tokens"):
        eng.generate([[1] * 16], sp)
    with pytest.raises(ValueError, match="not a token id"):
        eng.generate([[1, V]], sp)
    with pytest.raises(ValueError, match="n must be"):
        eng.generate([good], sp, n=0)
    with pytest.raises(ValueError, match="request 1: temperature"):
        eng.generate([good, good], [sp, SamplingParams(temperature=-1.0)])
    with pytest.raises(ValueError, match="request 0: top_p"):
        eng.generate([good], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        eng.generate([good], SamplingParams(stop_strings=("a",)))
    out = eng.generate([good, [], [1] * 20, good], sp, n=2, on_error="skip")
    assert [r[0].finish_reason for r in out] == ["length", "error", "error", "length"]
    assert "request 1" in out[1][0].error and out[1][1].tokens == [] and len(out[2]) == 2
    # the same prompt and seed at positions 0 and 3: the same samples (the seed keys them)
    assert [c.tokens for c in out[0]] == [c.tokens for c in out[3]] and out[0][0].tokens
    with pytest.raises(ValueError, match="sampling must be a SamplingParams or a list"):
        eng.generate([good], None)
    with pytest.raises(ValueError, match="sampling must be a SamplingParams or a list"):
        eng.generate([good], [None])


def test_release_and_reallocate(model: CausalLM) -> None:
    eng = Engine(model, max_num_seqs=2, max_model_len=32, kv_cache_memory=10**9)
    sp = SamplingParams(temperature=0.0, max_new_tokens=4)
    a = eng.generate([[7, 8, 9]], sp)
    eng.release_kv_cache()
    assert eng.cache is None
    b = eng.generate([[7, 8, 9]], sp)
    assert a[0][0].tokens == b[0][0].tokens
    with pytest.raises(ValueError, match="holds no sequence slot"):
        Engine(model, max_num_seqs=2, max_model_len=32, kv_cache_memory=100).generate([[1]], sp)


def test_graph_key_follows_adapter_slot() -> None:
    from orbit.adapters.inject import AdapterConfig, inject_adapters
    from orbit.rollout.engine import default_graph_key

    torch.manual_seed(0)
    cfg = ModelConfig(arch="LlamaForCausalLM", vocab_size=V, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    m = CausalLM(cfg)
    aset = inject_adapters(m, AdapterConfig(kind="lora", r=4, alpha=8))
    keys = set()
    for slot in (None, 0, 1):
        aset.set_active(slot)
        keys.add(default_graph_key(m))
    assert len(keys) == 3
    before = default_graph_key(m)  # slot 1 active
    aset.stage(0, 1)  # LoRA reads its slot tensors inside the graph: no re-capture needed
    assert default_graph_key(m) == before
    oft_model = CausalLM(cfg)
    oset = inject_adapters(oft_model, AdapterConfig(kind="oft", block_size=8))
    oset.set_active(1)
    before = default_graph_key(oft_model)
    oset.stage(0, 1)  # OFT's rotation is derived outside the graph: new values -> new capture
    assert default_graph_key(oft_model) != before
