"""CPU checks of the grouped MoE expert GEMM (orbit/kernels/moe_gemm.py): the Triton kernel
under Triton's interpreter (subprocess, tests/triton_interp.py) against the plain-PyTorch
reference, the reference against orbit's per-expert loop on a tiny quantized Qwen3-MoE, the
tile table, and input validation."""

from __future__ import annotations

import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

from orbit.kernels.moe_gemm import (
    StackedQuantWeight,
    grouped_qmm,
    grouped_qmm_reference,
    stack_expert_weights,
    tile_table,
)
from orbit.kernels.random_weights import random_qweight

pytest.importorskip("triton")

# Rows per expert: uneven, one expert empty, one spanning two 64-row tiles.
COUNTS = [5, 0, 70, 3]
CASES = [("int4", {"group_size": 32}, 128), ("int4", {"group_size": 64, "asym": True}, 256),
         ("fp8", {}, 256), ("nvfp4", {}, 128), ("mxfp4", {}, 128), ("int8", {"group_size": 32}, 128),
         ("bf16", {}, 128)]
OUT = 96


def _stacked(fmt: str, kw: dict, n: int, k: int, seed: int) -> StackedQuantWeight:
    return StackedQuantWeight.stack(
        [random_qweight(fmt, n, k, seed=seed * 10 + e, **kw) for e in range(len(COUNTS))])


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0] + counts).cumsum(0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _block_fwd_bwd(block, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_(True)
    y = block(xr)
    y.backward(gy)
    return y.detach(), xr.grad


def _interpreter_main() -> None:
    patch_interpreter(bf16_dot=True, bf16_round=True)
    from orbit.kernels import moe_gemm

    torch.manual_seed(0)
    out = {}
    offs = _offsets(COUNTS)
    r = sum(COUNTS)
    for i, (fmt, kw, k) in enumerate(CASES):
        sw = _stacked(fmt, kw, OUT, k, i)
        x, dy = torch.randn(r, k).bfloat16(), torch.randn(r, OUT).bfloat16()
        y = grouped_qmm(x, offs, sw, out=torch.full((r, OUT), float("nan")).bfloat16())
        dx = grouped_qmm(dy, offs, sw, transpose=True,
                         out=torch.full((r, k), float("nan")).bfloat16())
        ref_y = grouped_qmm_reference(x, offs, sw)
        ref_dx = grouped_qmm_reference(dy, offs, sw, transpose=True)
        out[str(i)] = [_rel(y, ref_y), _rel(dx, ref_dx),
                       bool(torch.isnan(y).any() or torch.isnan(dx).any())]
    # SparseMoeBlock's fused path (forced on CPU) against its loop, forward and input grad.
    _, block = _tiny_quant_moe(torch.bfloat16)
    x = torch.randn(13, 64).bfloat16()
    gy = torch.randn(13, 64).bfloat16()
    loop = _block_fwd_bwd(block, x, gy)
    stacks = tuple(stack_expert_weights(block.experts, p)
                   for p in ("gate_proj", "up_proj", "down_proj"))
    block._fused_weights = lambda _x: stacks
    calls = []
    inner = moe_gemm.grouped_qmm_autograd
    moe_gemm.grouped_qmm_autograd = lambda *a: calls.append(1) or inner(*a)
    res = [loop, _block_fwd_bwd(block, x, gy)]
    out["block"] = [_rel(res[1][0], res[0][0]), _rel(res[1][1], res[0][1]), len(calls)]
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp_results() -> dict:
    return run_in_interpreter(__file__)


def test_interpreted_fused_moe_block_matches_loop(interp_results: dict) -> None:
    ey, edx, calls = interp_results["block"]  # summation order only (bf16 outputs)
    assert calls == 3  # gate, up, down through the grouped kernel
    assert ey < 1e-2 and edx < 1e-2, (ey, edx)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_interpreted_grouped_kernel_matches_reference(interp_results: dict, case: int) -> None:
    ey, edx, has_nan = interp_results[str(case)]
    assert not has_nan, CASES[case]  # every element of the poisoned outputs was written
    # bf16 rounding patched to nearest-even: the kernel matches the reference to ~1e-5.
    assert ey < 1e-3 and edx < 1e-3, (CASES[case], ey, edx)


def test_tile_table_never_straddles_experts() -> None:
    offs = _offsets(COUNTS)
    tab = tile_table(offs, sum(COUNTS), 64).tolist()
    used = [t for t in tab if t[2] > t[1]]
    assert used == [[0, 0, 5], [2, 5, 69], [2, 69, 75], [3, 75, 78]]
    assert len(tab) == 2 + 4 and all(t == [0, 0, 0] for t in tab[len(used):])


def test_reference_is_the_dense_per_expert_matmul() -> None:
    sw = _stacked("int4", {"group_size": 32}, OUT, 128, 0)
    offs = _offsets(COUNTS)
    x = torch.randn(sum(COUNTS), 128).bfloat16()
    y = grouped_qmm_reference(x, offs, sw)
    for e, (a, b) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist())):
        torch.testing.assert_close(y[a:b], x[a:b] @ sw.expert(e).dequantize(torch.bfloat16).T,
                                   rtol=0, atol=0)


def _tiny_quant_moe(dtype: torch.dtype = torch.float32, fmt: str = "int4"):
    from orbit.models.config import ModelConfig
    from orbit.models.transformer import CausalLM
    from orbit.quant.convert import convert_linears

    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="Qwen3MoeForCausalLM", vocab_size=89, hidden_size=64, intermediate_size=64,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
        qk_norm=True, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    model = CausalLM(cfg).to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    convert_linears(model, fmt, targets=["*experts*"], group_size=32)
    return model, model.model.layers[0].mlp


def test_reference_matches_sparse_moe_loop_on_tiny_quantized_moe() -> None:
    _, block = _tiny_quant_moe()
    x = torch.randn(11, 64)
    with torch.no_grad():
        probs = torch.softmax(block.gate(x), -1)
        ids = torch.topk(probs, 2, -1).indices
        w = probs.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        loop = block._grouped(x, ids, w)  # CPU: the per-expert loop
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // 2
        offs = torch.cat([torch.zeros(1, dtype=torch.long),
                          torch.bincount(flat, minlength=6).cumsum(0)])
        xs = x[tok]
        stacks = {p: stack_expert_weights(block.experts, p) for p in ("gate_proj", "up_proj", "down_proj")}
        assert all(s is not None and s.fmt == "int4" for s in stacks.values())
        gate = _ref_f32(xs, offs, stacks["gate_proj"])
        up = _ref_f32(xs, offs, stacks["up_proj"])
        ys = _ref_f32(torch.nn.functional.silu(gate) * up, offs, stacks["down_proj"])
        ys = ys * w.reshape(-1)[order, None]
        fused = torch.zeros_like(x).index_add_(0, tok, ys)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)


def _ref_f32(x: torch.Tensor, offs: torch.Tensor, sw: StackedQuantWeight) -> torch.Tensor:
    """grouped_qmm_reference's loop in float32 (the public function takes bf16/fp16 only)."""
    y = x.new_zeros(x.shape[0], sw.shape[0])
    o = offs.tolist()
    for e in range(sw.num_experts):
        y[o[e]:o[e + 1]] = x[o[e]:o[e + 1]] @ sw.expert(e).dequantize(torch.float32).T
    return y


def test_stack_expert_weights_refuses_mixed_or_wrapped_experts() -> None:
    from orbit.quant.linear import QuantLinear

    _, block = _tiny_quant_moe()
    assert stack_expert_weights(block.experts, "gate_proj") is not None
    other = random_qweight("fp8", 32, 64)
    block.experts[1].gate_proj = QuantLinear(other)
    assert stack_expert_weights(block.experts, "gate_proj") is None  # mixed formats
    block.experts[1].gate_proj = torch.nn.Linear(64, 32, bias=False)
    assert stack_expert_weights(block.experts, "gate_proj") is None  # not quantized
    from orbit.adapters.inject import AdapterConfig, inject_adapters

    model, block2 = _tiny_quant_moe()
    inject_adapters(model, AdapterConfig(targets=["*experts*gate_proj"]))
    assert stack_expert_weights(block2.experts, "gate_proj") is None  # wrapped by an adapter
    assert stack_expert_weights(block2.experts, "up_proj") is not None


def test_grouped_qmm_rejects_bad_inputs() -> None:
    sw = _stacked("int4", {"group_size": 32}, OUT, 128, 0)
    offs = _offsets(COUNTS)
    r = sum(COUNTS)
    x = torch.randn(r, 128).bfloat16()
    with pytest.raises(ValueError, match="x must be bfloat16"):
        grouped_qmm(x.float(), offs, sw)
    with pytest.raises(ValueError, match="x has 64 features"):
        grouped_qmm(x[:, :64].contiguous(), offs, sw)
    with pytest.raises(ValueError, match="dy has 128 features"):
        grouped_qmm(x, offs, sw, transpose=True)
    with pytest.raises(ValueError, match="contiguous last dim"):
        grouped_qmm(torch.randn(128, r).bfloat16().T, offs, sw)
    with pytest.raises(ValueError, match="expert_offsets must be 1-D"):
        grouped_qmm(x, offs[:-1], sw)
    with pytest.raises(ValueError, match="expert_offsets must be int32"):
        grouped_qmm(x, offs.float(), sw)
    with pytest.raises(ValueError, match="rise from 0"):
        grouped_qmm_reference(x, offs - 1, sw)
    bad = StackedQuantWeight("int4", sw.shape, dict(sw.tensors, qweight=sw.tensors["qweight"].long()), 32)
    with pytest.raises(ValueError, match="'qweight'"):
        grouped_qmm(x, offs, bad)
    bad = StackedQuantWeight("int4", sw.shape, dict(sw.tensors, scale=sw.tensors["scale"][:, :, :2]), 32)
    with pytest.raises(ValueError, match="'scale' must have shape"):
        grouped_qmm(x, offs, bad)
    with pytest.raises(ValueError, match="group_size"):
        grouped_qmm(x, offs, StackedQuantWeight("int4", sw.shape, sw.tensors, 16))
    with pytest.raises(ValueError, match="out must be"):
        grouped_qmm(x, offs, sw, out=torch.empty(r, 95).bfloat16())
    with pytest.raises(ValueError, match="differs from expert 0"):
        StackedQuantWeight.stack([random_qweight("int4", 96, 128, group_size=32),
                                  random_qweight("fp8", 96, 128)])


if __name__ == "__main__":
    _interpreter_main()


def test_experts_share_the_stacked_weights() -> None:
    """After the fused path stacks a projection, every expert's buffers are slices of the
    stack (one copy of the weights), the loop computes the same output from them, and a
    checkpoint written from an expert holds tensors that own their memory."""
    from orbit.models.moe import share_stacked_weights
    from orbit.quant.checkpoint import write_linear

    _, block = _tiny_quant_moe(torch.float32)
    x = torch.randn(11, 64)
    with torch.no_grad():
        before = block(x)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        sw = stack_expert_weights(block.experts, proj)
        share_stacked_weights(block.experts, proj, sw)
        for e, ex in enumerate(block.experts):
            for name, t in sw.tensors.items():
                buf = getattr(getattr(ex, proj), name)
                assert buf.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                assert torch.equal(buf, t[e])
    with torch.no_grad():
        assert torch.equal(block(x), before)
    qw = block.experts[1].up_proj.quantized_weight()
    written = write_linear(qw, "m.up_proj", "compressed-tensors")
    for v in written.values():
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
