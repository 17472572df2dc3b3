"""The native engine on CUDA: graph-replayed decode against eager decode and the packed forward.

CUDA graphs bake in tensor addresses and shapes, so these tests drive the paths that could
go stale: padding to a batch bucket, several context buckets, slots handed between requests,
releasing and re-allocating the KV cache (graphs must be re-captured), and switching the
adapter state between calls (graphs keyed by the model state).
"""

from __future__ import annotations

import pytest
import torch
from gpu_models import V, small_qwen3

from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.logprobs import token_logprobs
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams

pytestmark = pytest.mark.gpu


def tiny(dtype: torch.dtype) -> CausalLM:
    return small_qwen3(None, dtype, hidden=128, kv_heads=2)


def prompts(k: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 300, (k,), generator=g).tolist()
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in lens]


def tokens(out) -> list[list[list[int]]]:
    return [[c.tokens for c in row] for row in out]


def packed_logprobs(model: CausalLM, prompt: list[int], toks: list[int], temperature: float) -> torch.Tensor:
    full = prompt + toks
    cu = cu_seqlens_from_lengths([len(full)], "cuda")
    with torch.no_grad():
        h = model(torch.tensor(full, device="cuda"), positions_from_lengths([len(full)], "cuda"),
                  AttnBatch.packed(cu))
    return token_logprobs(model, h[len(prompt) - 1 : -1], torch.tensor(toks, device="cuda"), temperature)


def test_graph_decode_equals_eager_float32() -> None:
    model = tiny(torch.float32)
    ps = prompts(11)  # 11 requests x 2 samples through 6 slots: batch sizes 6, 5, 3, 1 -> buckets
    sp = SamplingParams(temperature=0.8, max_new_tokens=300, seed=3, logprobs_mode="scaled",
                        stop_token_ids=(7, 8))
    eager = Engine(model, max_num_seqs=6, max_model_len=700, cuda_graph=False).generate(ps, sp, n=2)
    eng = Engine(model, max_num_seqs=6, max_model_len=700, cuda_graph=True)
    graph = eng.generate(ps, sp, n=2)
    assert eng._graphs is not None and len(eng._graphs.graphs) >= 3  # several (batch, ctx) buckets
    assert {k[2] for k in eng._graphs.graphs} >= {256, 512}  # crossed a context bucket
    assert tokens(graph) == tokens(eager)
    for re, rg in zip(eager, graph):
        for ce, cg in zip(re, rg):
            assert torch.allclose(torch.tensor(cg.logprobs), torch.tensor(ce.logprobs), atol=1e-4)
    # and both are the packed forward's log-probs
    for p, row in zip(ps[:3], graph[:3]):
        ref = packed_logprobs(model, p, row[0].tokens, 0.8).cpu()
        assert torch.allclose(torch.tensor(row[0].logprobs), ref, atol=1e-3)


def test_bf16_graphs_logprobs_close_to_trainer() -> None:
    model = tiny(torch.bfloat16)
    ps = prompts(8, seed=1)
    sp = SamplingParams(temperature=1.0, max_new_tokens=64, seed=0, ignore_eos=True)
    out = Engine(model, max_num_seqs=8, max_model_len=512).generate(ps, sp, n=1)
    diffs = []
    for p, (c,) in zip(ps, out):
        ref = packed_logprobs(model, p, c.tokens, 1.0).cpu()
        diffs.append((torch.tensor(c.logprobs) - ref).abs())
    d = torch.cat(diffs)
    assert d.mean() < 0.02 and d.max() < 0.25, (d.mean(), d.max())


def test_release_recapture_and_state_key() -> None:
    model = tiny(torch.float32)
    ps = prompts(5, seed=2)
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    state = {"k": 0}
    eng = Engine(model, max_num_seqs=4, max_model_len=512, graph_key=lambda: state["k"],
                 kv_cache_memory=0.2)
    a = eng.generate(ps, sp)
    eng.release_kv_cache()
    assert eng.cache is None and eng._graphs is None
    b = eng.generate(ps, sp)
    assert tokens(a) == tokens(b)
    n_graphs = len(eng._graphs.graphs)
    state["k"] = 1  # a new model state captures its own graphs
    eng.generate(ps, sp)
    assert len(eng._graphs.graphs) > n_graphs


def test_lora_slot_switch_is_seen_by_graphs() -> None:
    from orbit.adapters.inject import AdapterConfig, inject_adapters

    model = tiny(torch.float32)
    ps = prompts(3, seed=4)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    base = Engine(model, max_num_seqs=4, max_model_len=512).generate(ps, sp)
    aset = inject_adapters(model, AdapterConfig(kind="lora", r=8, alpha=16))
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.5)
    aset.stage(0, 1)
    eng = Engine(model, max_num_seqs=4, max_model_len=512)
    aset.set_active(None)
    off = eng.generate(ps, sp)
    aset.set_active(1)
    on = eng.generate(ps, sp)
    eager_on = Engine(model, max_num_seqs=4, max_model_len=512, cuda_graph=False).generate(ps, sp)
    assert tokens(off) == tokens(base)
    assert tokens(on) == tokens(eager_on) and tokens(on) != tokens(off)


def test_oft_stage_after_capture_is_seen() -> None:
    """OFT caches its rotation outside the graph: after a stage the engine must re-capture."""
    from orbit.adapters.inject import AdapterConfig, inject_adapters

    model = tiny(torch.float32)
    ps = prompts(3, seed=6)
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    aset = inject_adapters(model, AdapterConfig(kind="oft", block_size=16, dtype=torch.float32))
    aset.set_active(1)
    eng = Engine(model, max_num_seqs=4, max_model_len=512)
    first = eng.generate(ps, sp)  # identity rotation: captures graphs
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.3)
    aset.stage(0, 1)
    second = eng.generate(ps, sp)
    eager = Engine(model, max_num_seqs=4, max_model_len=512, cuda_graph=False).generate(ps, sp)
    assert tokens(second) == tokens(eager) and tokens(second) != tokens(first)


@pytest.mark.parametrize("fmt", ["int4", None])
def test_oft_rotation_groups_give_the_lone_rotations_bits(monkeypatch: pytest.MonkeyPatch,
                                                          fmt: str | None) -> None:
    """OFT sibling rotation groups (oft.GROUP_ROTATIONS: q/k/v and gate/up rotated in one
    launch) sample the tokens and log-prob bits of the lone rotations, graphs on, batch 1 and
    4, with a trained (non-identity) rotation."""
    from gpu_models import bits, mixed_prompts, run_engine

    from orbit.adapters import oft
    from orbit.adapters.inject import AdapterConfig, inject_adapters

    model = small_qwen3(fmt)
    aset = inject_adapters(model, AdapterConfig(kind="oft", block_size=16, dtype=torch.float32))
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.1)
    aset.set_active(0)
    ps = mixed_prompts(4)
    sp = SamplingParams(temperature=1.0, max_new_tokens=20, seed=2, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for on in (False, True):
            monkeypatch.setattr(oft, "GROUP_ROTATIONS", on)
            _, out = run_engine(model, ps, sp, batch)
            # (the first engine linked them; later ones find them linked)
            assert any(m.rotate_group is not None for m in model.modules()
                       if isinstance(m, oft.OFTLinear))
            outs.append(bits(out))
        assert outs[0] == outs[1], (fmt, batch)


def test_varlen_backend_matches_sdpa() -> None:
    pytest.importorskip("torch.nn.attention.varlen")
    model = tiny(torch.bfloat16)
    ps = prompts(6, seed=5)
    sp = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True, logprobs_mode="raw")
    a = Engine(model, max_num_seqs=4, max_model_len=512).generate(ps, sp)
    eng = Engine(model, max_num_seqs=4, max_model_len=400, attn_backend="varlen")
    assert eng.cache_len == 512  # rounded up to whole FlashAttention pages
    b = eng.generate(ps, sp)
    assert eng.cache is not None and eng.cache.max_len == 512
    same = sum(x.tokens == y.tokens for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert same >= len(ps) - 1  # bf16 may flip one near-tie; the rest must agree
    d = [abs(x - y) for ra, rb in zip(a, b) for ca, cb in zip(ra, rb) if ca.tokens == cb.tokens
         for x, y in zip(ca.logprobs, cb.logprobs)]
    assert max(d) < 0.1


@pytest.mark.parametrize("graphs", [True, False])
def test_triton_backend_matches_sdpa(graphs: bool) -> None:
    """attn_backend="triton": prefill and decode read the KV cache in place (no gather); the
    greedy tokens and their log-probs match the SDPA path, with and without CUDA graphs."""
    model = tiny(torch.bfloat16)
    ps = prompts(6, seed=7)
    sp = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True, logprobs_mode="raw")
    a = Engine(model, max_num_seqs=4, max_model_len=512, cuda_graph=graphs).generate(ps, sp)
    b = Engine(model, max_num_seqs=4, max_model_len=512, cuda_graph=graphs,
               attn_backend="triton").generate(ps, sp)
    # A random tiny model has many near-ties, so bf16 rounding may switch a greedy token; up
    # to the first switch both runs see the same tokens and must score them alike.
    prefix, d = [], []
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            n = next((i for i, (x, y) in enumerate(zip(ca.tokens, cb.tokens)) if x != y), 32)
            prefix.append(n)
            d += [abs(x - y) for x, y in zip(ca.logprobs[:n], cb.logprobs[:n])]
    assert min(prefix) >= 1 and sum(prefix) >= 0.5 * 32 * len(prefix), prefix
    assert max(d) < 0.1


def test_auto_backend_picks_varlen_only_where_native() -> None:
    from orbit.models.attention import varlen_supported

    model = tiny(torch.bfloat16)  # 8 query heads, 2 K/V heads
    native = varlen_supported("cuda", cached=True, gqa=True)
    eng = Engine(model, max_num_seqs=2, max_model_len=321, attn_backend="auto")
    assert eng.attn_backend == ("varlen" if native else "triton")
    assert eng.cache_len == (512 if native else 321)
    ps = prompts(3, seed=2)
    sp = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    assert all(len(c.tokens) == 8 for r in eng.generate(ps, sp) for c in r)
    # FlashAttention takes no fp32: auto stays on sdpa for an fp32 KV cache
    assert Engine(tiny(torch.float32), attn_backend="auto").attn_backend == "sdpa"


@pytest.mark.parametrize("backend, exact", [("triton", False), ("triton", True), ("sdpa", False)])
def test_overlap_matches_sync_decode(backend: str, exact: bool) -> None:
    """Overlapped decode (the CUDA default) against the synchronous loop, graphs on, with
    stop tokens ending rows mid-batch and requests waiting for slots. Exact mode
    (batch-invariant kernels): the same tokens, finish reasons and log-prob bits. Fast mode: a
    step that carries a discarded row (a sequence that stopped one step earlier) has another
    batch shape (graph bucket, split-KV choice), so its logits differ by batch-shape rounding,
    as with any change of batch composition, and a sampled token can flip at a near-tie:
    completions agree on long shared prefixes, with close log-probs there."""
    model = tiny(torch.bfloat16)
    ps = prompts(7, seed=4)
    sp = [SamplingParams(temperature=1.0, max_new_tokens=20 + 7 * i, seed=i,
                         stop_token_ids=list(range(2, V, 29))) for i in range(len(ps))]
    runs = []
    for overlap in (False, True):
        eng = Engine(model, max_num_seqs=4, max_model_len=512, attn_backend=backend,
                     exact=exact, overlap=overlap)
        runs.append((eng.generate(ps, sp, n=2), eng.last_stats))
    (a, sa), (b, sb) = runs
    assert sa["overlapped_steps"] == 0 and sb["overlapped_steps"] > 0
    assert "stop" in {c.finish_reason for row in b for c in row}  # rows ended mid-batch
    agree = total = 0
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            if exact:
                assert ca.tokens == cb.tokens and ca.finish_reason == cb.finish_reason
                assert ca.logprobs == cb.logprobs
                continue
            n = next((i for i, (x, y) in enumerate(zip(ca.tokens, cb.tokens)) if x != y),
                     min(len(ca.tokens), len(cb.tokens)))
            agree += n
            total += len(ca.tokens)
            if n:
                d = (torch.tensor(ca.logprobs[:n]) - torch.tensor(cb.logprobs[:n])).abs().max()
                assert d < 0.05, float(d)
    assert exact or agree >= 0.75 * total, (agree, total)


def test_embedded_smollm2_generates() -> None:
    from orbit.assets import default_gguf_path

    try:
        path = default_gguf_path()
    except ValueError as e:
        pytest.skip(str(e))
    from orbit.models.loader import load_model
    from orbit.models.tokenizer import chat_prompt_ids, stop_token_ids

    model, tok = load_model(path, dtype=torch.bfloat16, device="cuda")
    model.requires_grad_(False)
    eng = Engine(model, max_num_seqs=16, max_model_len=1024, tokenizer=tok,
                 eos_token_ids=stop_token_ids(tok, model.config.eos_token_ids))
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    (row,) = eng.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=48))
    assert "Paris" in row[0].text, row[0].text
    out = eng.generate([ids] * 32, SamplingParams(temperature=1.0, max_new_tokens=64, seed=1), n=2)
    assert all(len(c.tokens) > 0 for r in out for c in r)
