"""The CUDA `varlen` and `triton` attention backends against the SDPA reference path, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from orbit.models.attention import (
    AttnBatch,
    KVCache,
    cu_seqlens_from_lengths,
    positions_from_lengths,
)
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM

pytestmark = pytest.mark.gpu
LENGTHS = [37, 300, 5, 129]


def tiny() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="Qwen3ForCausalLM", vocab_size=97, hidden_size=128, intermediate_size=256,
                      num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                      max_position_embeddings=1024, qk_norm=True)
    model = CausalLM(cfg).to("cuda", torch.bfloat16)
    model.model.rotary_emb.reset("cuda")
    return model


def run_packed(model: CausalLM, ids: torch.Tensor, backend: str) -> torch.Tensor:
    cu = cu_seqlens_from_lengths(LENGTHS, "cuda")
    return model.logits(model(ids, positions_from_lengths(LENGTHS, "cuda"), AttnBatch.packed(cu, backend=backend)))


def test_varlen_packed_matches_sdpa_forward_and_backward() -> None:
    model = tiny()
    ids = torch.randint(0, 97, (sum(LENGTHS),), device="cuda")
    w = model.model.layers[0].self_attn.q_proj.weight
    out, grads = {}, {}
    for backend in ("sdpa", "varlen"):
        w.grad = None
        lg = run_packed(model, ids, backend)
        lg.logsumexp(-1).sum().backward()
        out[backend], grads[backend] = lg.detach(), w.grad.float().clone()
    torch.testing.assert_close(out["varlen"], out["sdpa"], rtol=2e-2, atol=2e-2)
    rel = (grads["varlen"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
    assert rel < 2e-2, rel


@torch.no_grad()
@pytest.mark.parametrize("backend", ["varlen", "triton"])
def test_cached_prefill_and_decode_match_sdpa(backend: str) -> None:
    """Prefill into a cache, then decode from it, with `backend` (triton: the cache is read
    in place) against one packed SDPA forward of the whole sequences."""
    model = tiny()
    ids = torch.randint(0, 97, (sum(LENGTHS),), device="cuda")
    ref = run_packed(model, ids, "sdpa").split(LENGTHS)
    seqs = ids.split(LENGTHS)
    cache = KVCache.for_model(model.config, num_slots=6, max_len=512, dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([5, 1, 0, 3], device="cuda")
    pre = [n - 2 for n in LENGTHS]
    x = torch.cat([s[:n] for s, n in zip(seqs, pre)])
    batch = AttnBatch.cached(cache, slots, cu_seqlens_from_lengths(pre, "cuda"),
                             torch.zeros(4, dtype=torch.long, device="cuda"), backend=backend)
    got = model.logits(model(x, positions_from_lengths(pre, "cuda"), batch)).split(pre)
    for b in range(4):
        torch.testing.assert_close(got[b], ref[b][: pre[b]], rtol=2e-2, atol=2e-2)
    for step in range(2):
        sp = torch.tensor([n + step for n in pre], device="cuda")
        x = torch.stack([s[p] for s, p in zip(seqs, sp.tolist())])
        batch = AttnBatch.cached(cache, slots, torch.arange(5, device="cuda", dtype=torch.int32), sp,
                                 max_context=512, backend=backend)
        lg = model.logits(model(x, sp, batch))
        for b in range(4):
            torch.testing.assert_close(lg[b], ref[b][pre[b] + step], rtol=2e-2, atol=2e-2)
