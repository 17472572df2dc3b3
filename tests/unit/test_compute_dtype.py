"""What `--compute-dtype auto` resolves to, and the CPU attention rule that goes with bf16:
SDPA in float32 on a CPU, the engine's CPU KV cache in float32 (the model's dtype in exact
mode), trainer and sampler still agreeing."""

from __future__ import annotations

import pytest
import torch

from orbit.models import dtypes
from orbit.models.attention import AttnBatch, cache_dtype, cu_seqlens_from_lengths, sdpa_dtype
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


def test_auto_follows_the_cpu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert dtypes.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert dtypes.resolve_compute_dtype("auto", "cpu") == torch.float32
    assert dtypes.resolve_compute_dtype("auto", "cuda") == torch.bfloat16
    assert dtypes.resolve_compute_dtype("float32", "cuda") == torch.float32
    assert dtypes.resolve_compute_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="'auto', 'bf16' or 'float32', got 'fp16'"):
        dtypes.resolve_compute_dtype("fp16", "cpu")


def test_slow_cpu_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The quickstart's 12-step default: a float32 CPU run without AVX-512, nothing else."""
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "AVX2" in dtypes.slow_cpu_reason("cpu", "auto")
    assert dtypes.slow_cpu_reason("cpu", "bf16") is None
    assert dtypes.slow_cpu_reason("cuda", "float32") is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert dtypes.slow_cpu_reason("cpu", "float32") is None
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda, got 'xpu'"):
        dtypes.slow_cpu_reason("xpu")


def test_cpu_probe_is_a_bool() -> None:
    assert isinstance(dtypes.cpu_has_native_bf16(), bool)


def test_cpu_attention_and_cache_dtypes() -> None:
    q = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    assert sdpa_dtype(q) == torch.float32
    assert cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert cache_dtype(torch.bfloat16, torch.device("cpu"), exact=True) == torch.bfloat16
    assert cache_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_packed_bf16_attention_is_float32_math_of_the_bf16_values() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 3]
    q = torch.randn(8, 4, 16, generator=g).bfloat16()
    k = torch.randn(8, 2, 16, generator=g).bfloat16()
    v = torch.randn(8, 2, 16, generator=g).bfloat16()
    out = AttnBatch.packed(cu_seqlens_from_lengths(lengths)).attend(0, q, k, v)
    assert out.dtype == torch.bfloat16
    want = AttnBatch.packed(cu_seqlens_from_lengths(lengths)).attend(0, q.float(), k.float(), v.float())
    assert torch.equal(out, want.bfloat16())


def _tiny(dtype: torch.dtype) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=64, qk_norm=True)
    return CausalLM(cfg).to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("exact", [False, True])
def test_bf16_engine_on_cpu_matches_the_packed_forward(exact: bool) -> None:
    """A bf16 model's engine on a CPU: its KV cache dtype follows `cache_dtype`, and the
    sampled tokens' log-probs equal a packed re-score of the same sequences to bf16 rounding."""
    from orbit.alignment.measure import measure_mismatch

    model = _tiny(torch.bfloat16)
    if exact:
        from orbit.alignment.exact import convert_exact

        convert_exact(model)
    eng = Engine(model, max_num_seqs=4, max_model_len=40, device="cpu", exact=exact)
    assert eng.dtype == (torch.bfloat16 if exact else torch.float32)
    assert eng.model_dtype == torch.bfloat16
    prompts = [[3, 5, 7, 11], [13, 17, 19]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=4)
    res = measure_mismatch(model, eng, prompts, sp, n=2)
    if exact:
        assert res.metrics.max_abs == 0.0
    else:
        assert res.metrics.mean_abs < 5e-2
