"""The `triton` attention backend (the KV cache read in place by orbit.kernels.attention_exact's
kernel) on CPU under Triton's interpreter: prefill into a cache at scattered slots, then two
decode steps, against one packed SDPA forward of the whole sequences (fp32, tiny Qwen3 with
GQA and QK-norm). The same check runs on CUDA in tests/gpu/test_models_attention_gpu.py."""

from __future__ import annotations

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

pytest.importorskip("triton")
LENGTHS = [37, 70, 5, 19]


def _interpreter_main() -> None:
    import json

    patch_interpreter()
    from orbit.models.attention import (
        AttnBatch,
        KVCache,
        cu_seqlens_from_lengths,
        positions_from_lengths,
    )
    from orbit.models.config import ModelConfig
    from orbit.models.transformer import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=256, qk_norm=True)
    model = CausalLM(cfg).eval()
    ids = torch.randint(0, 97, (sum(LENGTHS),))
    out = {}
    with torch.no_grad():
        ref = model.logits(model(ids, positions_from_lengths(LENGTHS),
                                 AttnBatch.packed(cu_seqlens_from_lengths(LENGTHS)))).split(LENGTHS)
        seqs = ids.split(LENGTHS)
        cache = KVCache.for_model(cfg, num_slots=6, max_len=128, dtype=torch.float32, device="cpu")
        slots = torch.tensor([5, 1, 0, 3])
        pre = [n - 2 for n in LENGTHS]
        x = torch.cat([s[:n] for s, n in zip(seqs, pre)])
        batch = AttnBatch.cached(cache, slots, cu_seqlens_from_lengths(pre),
                                 torch.zeros(4, dtype=torch.long), backend="triton")
        got = model.logits(model(x, positions_from_lengths(pre), batch)).split(pre)
        out["prefill"] = max(float((g - r[:n]).abs().max()) for g, r, n in zip(got, ref, pre))
        for step in range(2):
            sp = torch.tensor([n + step for n in pre])
            x = torch.stack([s[p] for s, p in zip(seqs, sp.tolist())])
            batch = AttnBatch.cached(cache, slots, torch.arange(5, dtype=torch.int32), sp,
                                     max_context=128, backend="triton")
            lg = model.logits(model(x, sp, batch))
            out[f"decode{step}"] = max(float((lg[b] - ref[b][pre[b] + step]).abs().max())
                                       for b in range(4))
            # the same step with split-KV decode (fast mode): 2 chunks of 64 positions here
            batch = AttnBatch.cached(cache, slots, torch.arange(5, dtype=torch.int32), sp,
                                     max_context=128, backend="triton", split_kv=True)
            lg = model.logits(model(x, sp, batch))
            out[f"split{step}"] = max(float((lg[b] - ref[b][pre[b] + step]).abs().max())
                                      for b in range(4))
            # and with q/k norm + RoPE + the cache write inside the attention launch
            # (AttnBatch.attend_rope; the fused-kernel gates opened for the interpreter), against
            # the separate one-launch norm/RoPE/cache write of the same step
            folded = {}
            import orbit.kernels.attention_decode as ad

            real, ropes = ad.attention_decode_split, []
            ad.attention_decode_split = _spy(real, ropes)
            for fold in (False, True):
                with _fused_norm_rope_on_cpu():
                    batch = AttnBatch.cached(cache, slots, torch.arange(5, dtype=torch.int32),
                                             sp, max_context=128, backend="triton",
                                             split_kv=True, fold_rope=fold)
                    folded[fold] = model.logits(model(x, sp, batch))
            out[f"fold{step}"] = max(float((folded[True][b] - ref[b][pre[b] + step]).abs().max())
                                     for b in range(4))
            ad.attention_decode_split = real
            out[f"fold_vs_launch{step}"] = float((folded[True] - folded[False]).abs().max())
            out[f"fold_launches{step}"] = ropes  # per layer: separate launch, then folded
    print(json.dumps(out))


def _spy(real, ropes: list):
    """attention_decode_split that records whether each call folds the norm/RoPE."""
    def spy(*a, rope=None, **kw):
        ropes.append(rope is not None)
        return real(*a, rope=rope, **kw)

    return spy


class _fused_norm_rope_on_cpu:
    """The fused norm/RoPE gates check for CUDA; under the interpreter they may run on CPU."""

    def __enter__(self) -> None:
        import orbit.models.transformer as tr
        from orbit.kernels import rope

        self.saved = rope.fused_norm_rope_available, tr.fused_norm_rope_available
        ok = lambda x: x.shape[-1] >= 16 and not (x.shape[-1] & (x.shape[-1] - 1))  # noqa: E731
        rope.fused_norm_rope_available = tr.fused_norm_rope_available = ok

    def __exit__(self, *exc: object) -> None:
        import orbit.models.transformer as tr
        from orbit.kernels import rope

        rope.fused_norm_rope_available, tr.fused_norm_rope_available = self.saved


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("stage", ["prefill", "decode0", "decode1", "split0", "split1", "fold0",
                                   "fold1"])
def test_triton_backend_matches_packed_sdpa(interp_results: dict, stage: str) -> None:
    assert interp_results[stage] < 1e-4, interp_results  # fp32, reduction order only


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter() -> None:
    from orbit.models.attention import AttnBatch, KVCache
    from orbit.models.config import ModelConfig

    cfg = ModelConfig(arch="LlamaForCausalLM", vocab_size=11, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      max_position_embeddings=64)
    cache = KVCache.for_model(cfg, num_slots=1, max_len=8, dtype=torch.float32, device="cpu")
    batch = AttnBatch.cached(cache, torch.tensor([0]), torch.tensor([0, 1], dtype=torch.int32),
                             torch.tensor([0]), backend="triton")
    q, k = torch.randn(1, 2, 16), torch.randn(1, 1, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        batch.attend(0, q, k, k.clone())


if __name__ == "__main__":
    _interpreter_main()


def test_folded_norm_rope_equals_its_separate_launch(interp_results: dict) -> None:
    for step in (0, 1):
        assert interp_results[f"fold_vs_launch{step}"] <= 1e-6, interp_results
        # two layers without the fold, then the same two with it
        assert interp_results[f"fold_launches{step}"] == [False, False, True, True]
