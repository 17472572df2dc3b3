"""Adapters on Orbit's own CausalLM (Qwen3-MoE): every expert linear is a target like any
other linear, the router is not, and the same packed forward trains the adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from orbit.adapters import AdapterConfig, LoRALinear, OFTLinear, inject_adapters
from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM

LENGTHS = [5, 8]


def tiny_moe() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="Qwen3MoeForCausalLM",
        vocab_size=89,
        hidden_size=48,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        max_position_embeddings=64,
        qk_norm=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
    )
    return CausalLM(cfg)


def run(model: CausalLM) -> torch.Tensor:
    ids = torch.randint(0, 89, (sum(LENGTHS),), generator=torch.Generator().manual_seed(1))
    attn = AttnBatch.packed(cu_seqlens_from_lengths(LENGTHS))
    return model.logits(model(ids, positions_from_lengths(LENGTHS), attn))


@pytest.mark.parametrize("kind,cls", [("lora", LoRALinear), ("oft", OFTLinear)])
def test_moe_experts_are_targets(tmp_path, kind, cls):
    model = tiny_moe()
    with torch.no_grad():
        base_logits = run(model)
    aset = inject_adapters(model, AdapterConfig(kind=kind, r=4, block_size=8, dtype=torch.float32))
    layer = model.model.layers[1].mlp
    assert isinstance(layer.experts[3].down_proj, cls)
    assert not isinstance(layer.gate, cls)  # the router stays a plain frozen linear
    assert len(aset.modules) == 2 * (4 + 4 * 3)  # q,k,v,o + 4 experts x (gate, up, down)
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.1)
    with aset.adapter_disabled(), torch.no_grad():
        assert torch.equal(run(model), base_logits)
    loss = run(model).logsumexp(-1).mean()
    loss.backward()
    expert_grads = [p.grad for n, p in aset.named_trainable_parameters() if ".experts." in n]
    assert expert_grads and any(g is not None and g.abs().sum() > 0 for g in expert_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    aset.save_peft(tmp_path / "ad")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    name = "oft_R" if kind == "oft" else "lora_A"
    assert f"base_model.model.model.layers.0.mlp.experts.2.up_proj.{name}.weight" in keys


@pytest.mark.parametrize("ckpt", [False, True])
def test_batched_oft_rotations_match_per_module(ckpt):
    """The per-forward batched R build gives the same loss and grads as per-module R, also
    under activation checkpointing (the recompute reuses the step's R)."""
    grads = []
    for batched in (False, True):
        model = tiny_moe()
        model.gradient_checkpointing = ckpt
        aset = inject_adapters(
            model, AdapterConfig(kind="oft", block_size=8, num_terms=5, dtype=torch.float32)
        )
        aset.batched_rotations = batched
        with torch.no_grad():
            for i, p in enumerate(aset.trainable_parameters()):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
        for step in range(2):  # the second forward must rebuild R after the optimizer step
            out = run(model)
            if batched:  # the forward really used the batched R (its version key still holds)
                assert all(m._cached_rotation(0) is m._step_rot[2] for m in aset.modules.values())
            loss = out.logsumexp(-1).mean()
            loss.backward()
            if batched:  # backward went through R: it is spent
                assert not any(m._step_rot[3]["live"] for m in aset.modules.values())
            with torch.no_grad():
                for p in aset.trainable_parameters():
                    p.sub_(0.1 * p.grad)
        built = [m._step_rot is not None for m in aset.modules.values()]
        assert all(built) if batched else not any(built)
        grads.append((loss.detach(), [p.grad.clone() for p in aset.trainable_parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_forward_bypassing_root_hook_after_backward():
    """Gradient accumulation where a second micro-batch calls `model.forward` directly (no
    pre-hook): the spent batched R must not be reused (its graph is freed)."""
    model = tiny_moe()
    aset = inject_adapters(model, AdapterConfig(kind="oft", block_size=8, dtype=torch.float32))
    with torch.no_grad():
        for p in aset.trainable_parameters():
            p.normal_(0, 0.1)
    run(model).logsumexp(-1).mean().backward()
    first = [p.grad.clone() for p in aset.trainable_parameters()]
    ids = torch.randint(0, 89, (sum(LENGTHS),), generator=torch.Generator().manual_seed(1))
    attn = AttnBatch.packed(cu_seqlens_from_lengths(LENGTHS))
    h = model.forward(ids, positions_from_lengths(LENGTHS), attn)
    model.logits(h).logsumexp(-1).mean().backward()
    for g0, p in zip(first, aset.trainable_parameters()):
        torch.testing.assert_close(p.grad, 2 * g0, rtol=1e-5, atol=1e-6)
