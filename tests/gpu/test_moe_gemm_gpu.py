"""GPU checks of the grouped MoE expert GEMM (orbit/kernels/moe_gemm.py) and of
SparseMoeBlock's fused path. Outputs are poisoned with NaN first (every element proved
written) and compared by relative norm with the plain-PyTorch reference.
Run: `pytest -m gpu tests/gpu/test_moe_gemm_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

from orbit.kernels.moe_gemm import (
    StackedQuantWeight,
    grouped_qmm,
    grouped_qmm_reference,
    stack_expert_weights,
)
from orbit.kernels.random_weights import random_qweight

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = 1e-2  # bf16 output rounding is ~2e-3 relative; summation order adds less
E, TOKENS, TOP_K = 128, 512, 8  # Qwen3-30B-A3B experts and routing
FORMATS = [("int4", {"group_size": 128}), ("int4", {"group_size": 64, "asym": True}),
           ("fp8", {}), ("nvfp4", {})]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _routing_offsets(seed: int) -> tuple[torch.Tensor, int]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(TOKENS, E, device="cuda", generator=g) * 2  # skewed loads
    ids = torch.topk(logits, TOP_K, -1).indices.reshape(-1)
    counts = torch.bincount(ids, minlength=E)
    offs = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return offs, ids.numel()


@pytest.mark.parametrize(("fmt", "kw"), FORMATS)
@pytest.mark.parametrize(("k", "n"), [(2048, 768), (768, 2048)])  # gate/up, down
def test_grouped_kernel_matches_reference_at_qwen3_30b_shape(fmt: str, kw: dict, k: int,
                                                             n: int) -> None:
    if fmt == "int4" and k % kw["group_size"]:
        pytest.skip("group does not divide in")
    sw = StackedQuantWeight.stack(
        [random_qweight(fmt, n, k, seed=e, device="cuda", **kw) for e in range(E)])
    offs, r = _routing_offsets(k + n)
    x = torch.randn(r, k, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(r, n, device="cuda", dtype=torch.bfloat16)
    y = grouped_qmm(x, offs, sw, out=torch.full((r, n), float("nan"), device="cuda",
                                                  dtype=torch.bfloat16))
    dx = grouped_qmm(dy, offs, sw, transpose=True,
                     out=torch.full((r, k), float("nan"), device="cuda", dtype=torch.bfloat16))
    assert not torch.isnan(y).any() and not torch.isnan(dx).any()
    assert _rel(y, grouped_qmm_reference(x, offs, sw)) < TOL
    assert _rel(dx, grouped_qmm_reference(dy, offs, sw, transpose=True)) < TOL


def test_grouped_kernel_with_empty_experts_and_no_rows() -> None:
    sw = StackedQuantWeight.stack(
        [random_qweight("int4", 96, 256, group_size=32, seed=e, device="cuda") for e in range(4)])
    offs = torch.tensor([0, 0, 70, 70, 73], device="cuda")
    x = torch.randn(73, 256, device="cuda", dtype=torch.bfloat16)
    y = grouped_qmm(x, offs, sw, out=torch.full((73, 96), float("nan"), device="cuda",
                                                 dtype=torch.bfloat16))
    assert _rel(y, grouped_qmm_reference(x, offs, sw)) < TOL
    empty = torch.zeros(0, 256, device="cuda", dtype=torch.bfloat16)
    z = torch.zeros(5, device="cuda", dtype=torch.long)
    assert grouped_qmm(empty, z, sw).shape == (0, 96)


def _tiny_model(fmt: str, kw: dict):
    from orbit.adapters.inject import AdapterConfig, inject_adapters
    from orbit.models.config import ModelConfig
    from orbit.models.transformer import CausalLM
    from orbit.quant.convert import convert_linears

    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="Qwen3MoeForCausalLM", vocab_size=89, hidden_size=256, intermediate_size=256,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=64,
        qk_norm=True, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        norm_topk_prob=True,
    )
    model = CausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    convert_linears(model, fmt, targets=["*experts*"], **kw)
    adapters = inject_adapters(model, AdapterConfig(targets=("q_proj", "v_proj"), r=4))
    model.to("cuda")
    for p in model.parameters():  # LoRA B starts at 0: give it values so A gets a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    return model, adapters


@pytest.mark.parametrize(("fmt", "kw"), [("int4", {"group_size": 64}), ("fp8", {}),
                                         ("nvfp4", {})])
def test_fused_moe_block_matches_loop(fmt: str, kw: dict) -> None:
    """The fused grouped-kernel experts, the per-expert loop and a reference (every QuantLinear
    multiplying by its cached dequantized weight: cuBLAS, no quantized kernel) give the same
    output and LoRA grads. The loss is a fixed random projection of the output: mean(h^2) of
    the final RMSNorm's output is ~1 whatever its input, so its gradient is rounding noise
    (what this test compared until session 33, where it failed by 80-90% on one ulp of h)."""
    from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths, positions_from_lengths
    from orbit.models.moe import MoERouting, SparseMoeBlock, set_fused_experts
    from orbit.quant.linear import QuantLinear

    model, _ = _tiny_model(fmt, kw)
    lengths = [7, 12, 5]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 89, (sum(lengths),), generator=g).cuda()
    pos = positions_from_lengths(lengths).cuda()
    routing = MoERouting("record")  # the reference's expert choices, replayed by the others
    attn = AttnBatch.packed(cu_seqlens_from_lengths(lengths).cuda(), routing=routing)
    proj = torch.randn(sum(lengths), 256, generator=g).cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    block = model.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock)
    results = {}
    for run in ("reference", "loop", "fused"):
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.cache_dequantized = True if run == "reference" else None
        assert set_fused_experts(model, run == "fused") == len(model.model.layers)
        for p in trainable:
            p.grad = None
        h = model(ids, pos, attn)
        routing.mode = "replay"
        (h.float() * proj).sum().backward()
        results[run] = (h.detach(), [p.grad.clone() for p in trainable])
        if run == "fused":
            assert block._fused_cache is not None and block._fused_cache[1] is not None
    h_ref, g_ref = results["reference"]
    for run in ("loop", "fused"):
        h, grads = results[run]
        assert _rel(h, h_ref) < 2e-2, run
        for a, b in zip(grads, g_ref, strict=True):
            assert _rel(a, b) < 5e-2, run


def test_stacked_cache_follows_the_device() -> None:
    from orbit.models.moe import set_fused_experts

    model, _ = _tiny_model("int4", {"group_size": 64})
    set_fused_experts(model, True)
    block = model.model.layers[0].mlp
    x = torch.randn(9, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        block(x)
    assert block._fused_cache is not None
    model.to("cpu")
    assert block._fused_cache is None
    assert stack_expert_weights(block.experts, "gate_proj").device.type == "cpu"
