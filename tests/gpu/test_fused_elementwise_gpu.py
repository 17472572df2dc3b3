"""Decode-launch fusions on CUDA are bit for bit the unfused torch forward: silu * up, add +
RMSNorm, and a whole model's no-autograd forward (fused adds, fused SwiGLU, grouped sibling
GEMVs off) against its autograd forward (the trainer's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orbit.kernels.rmsnorm_exact import add_rmsnorm_triton, rmsnorm_exact_triton
from orbit.kernels.swiglu import silu_mul
from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 6144), (37, 1536), (256, 6144)])
def test_silu_mul_bitwise(dtype: torch.dtype, shape: tuple) -> None:
    g = 4 * torch.randn(*shape, device="cuda").to(dtype)
    g[0, :8] = torch.tensor([0.0, -0.0, 30.0, -30.0, 88.0, -88.0, 1e-3, -1e-3], dtype=dtype)
    u = torch.randn(*shape, device="cuda").to(dtype)
    assert torch.equal(silu_mul(g, u), F.silu(g) * u)


@pytest.mark.parametrize("rows,d", [(1, 2048), (64, 576), (300, 4096)])
def test_add_rmsnorm_bitwise(rows: int, d: int) -> None:
    x = torch.randn(rows, d, device="cuda").bfloat16()
    r = torch.randn(rows, d, device="cuda").bfloat16()
    w = (1 + 0.1 * torch.randn(d, device="cuda")).bfloat16()
    s, y = add_rmsnorm_triton(x, r, w, 1e-6)
    assert torch.equal(s, x + r)
    assert torch.equal(y, rmsnorm_exact_triton(x + r, w, 1e-6))


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_no_grad_forward_equals_autograd_forward(arch: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=503, hidden_size=256, intermediate_size=512,
                      num_layers=3, num_heads=8, num_kv_heads=4, head_dim=32,
                      qk_norm=arch.startswith("Qwen3"), max_position_embeddings=512, eos_token_id=1)
    model = CausalLM(cfg).to("cuda", torch.bfloat16)
    model.model.rotary_emb.reset("cuda")
    lens = [5, 1, 17]
    ids = torch.randint(0, 503, (sum(lens),), device="cuda")
    pos = positions_from_lengths(lens, "cuda")
    attn = AttnBatch.packed(cu_seqlens_from_lengths(lens, "cuda"))
    with torch.no_grad():
        fused = model(ids, pos, attn)
    model.requires_grad_(True)
    trained = model(ids, pos, AttnBatch.packed(cu_seqlens_from_lengths(lens, "cuda")))
    assert trained.requires_grad
    assert torch.equal(fused, trained.detach())
