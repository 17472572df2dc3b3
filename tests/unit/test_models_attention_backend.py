"""Choosing the attention backend on CPU: what `varlen_attn` signatures of several torch
releases allow, and the engine's `attn_backend` resolution ("auto" -> sdpa without CUDA).

The varlen kernels themselves only run on CUDA (tests/gpu/test_models_attention_gpu.py and
tests/gpu/test_engine_gpu.py compare them with SDPA). Here the signatures below are the
public ones of torch 2.9 (is_causal), 2.10/2.11 (window_size; one 2.11 development state
with k_cache/page_table but no block_table), and 2.12+ (enable_gqa, seqused_k, block_table).
"""

from __future__ import annotations

from typing import Any

import pytest
from tiny_qwen3 import tiny_qwen3

from orbit.models.attention import read_varlen_api, varlen_api, varlen_supported
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine


def v29(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
        return_aux=None) -> Any:
    raise AssertionError("never called")


def v211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
         scale=None, window_size=(-1, -1)) -> Any:
    raise AssertionError("never called")


def v211_dev(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
             scale=None, window_size=(-1, -1), k_cache=None, v_cache=None,
             cache_seqlens=None, cache_batch_idx=None, page_table=None,
             seqused_k=None) -> Any:
    raise AssertionError("never called")


def v212(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
         scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
         block_table=None, num_splits=None) -> Any:
    raise AssertionError("never called")


def no_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k) -> Any:
    raise AssertionError("never called")


@pytest.mark.parametrize("fn,causal,gqa,paged", [
    (v29, {"is_causal": True}, False, False),
    (v211, {"window_size": (-1, 0)}, False, False),
    (v211_dev, {"window_size": (-1, 0)}, False, False),
    (v212, {"window_size": (-1, 0)}, True, True),
])
def test_varlen_api_read_from_signature(fn: Any, causal: dict, gqa: bool, paged: bool) -> None:
    api = read_varlen_api(fn)
    assert api is not None and api.fn is fn
    assert (api.causal, api.gqa, api.paged) == (causal, gqa, paged)


def test_varlen_api_without_causal_mode_is_unusable() -> None:
    assert read_varlen_api(no_causal) is None


def test_installed_varlen_api_and_cpu_support() -> None:
    api = varlen_api()
    if api is not None:
        from torch.nn.attention.varlen import varlen_attn

        assert api.fn is varlen_attn and varlen_api() is api  # read once
    assert not varlen_supported("cpu") and not varlen_supported("cpu", cached=True, gqa=True)


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return tiny_qwen3(max_positions=1024)


def test_engine_auto_is_sdpa_on_cpu_and_keeps_the_cache_length(model: CausalLM) -> None:
    eng = Engine(model, max_num_seqs=2, max_model_len=321, attn_backend="auto")
    assert eng.attn_backend == "sdpa" and eng.cache_len == 321
    eng.allocate_kv_cache()
    assert eng.cache is not None and eng.cache.max_len == 321
    assert eng.slot_bytes() == eng.cache.nbytes() // eng.cache.num_slots


def test_engine_rejects_unknown_or_cpu_varlen_backend(model: CausalLM) -> None:
    with pytest.raises(ValueError, match="attn_backend must be"):
        Engine(model, max_model_len=64, attn_backend="flash")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(model, max_model_len=64, attn_backend="varlen")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(model, max_model_len=64, attn_backend="triton")
