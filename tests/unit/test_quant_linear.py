"""QuantLinear forward/backward against the dequantized reference, and convert_linears on a
tiny transformers Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orbit.quant.convert import DEFAULT_TARGETS, convert_linears, name_matches, replace_linear
from orbit.quant.linear import QuantLinear
from orbit.quant.quantize import quantize

FMTS = [
    ("bf16", {}),
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 32, "symmetric": False}),
    ("int8", {"group_size": 64}),
    ("fp8", {}),
    ("nvfp4", {}),
    ("mxfp4", {}),
]


def _layer(fmt: str, kw: dict, bias: bool = True, seed: int = 0, **lkw) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=g) * 0.05
    b = torch.randn(48, generator=g) if bias else None
    return QuantLinear(quantize(w, fmt, **kw), b, **lkw)


@pytest.mark.parametrize("fmt,kw", FMTS, ids=[f"{f}-{k}" for f, k in FMTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_reference_exactly(fmt: str, kw: dict, dtype: torch.dtype) -> None:
    layer = _layer(fmt, kw)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    ref = (x.reshape(-1, 128) @ layer.dequantize(dtype).T + layer.bias.to(dtype)).reshape(2, 5, 48)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    assert torch.equal(y, ref)
    # uncached (the dispatch path) gives the same numbers on CPU
    uncached = QuantLinear(layer.quantized_weight(), layer.bias, cache_dequantized=False)
    assert torch.equal(uncached(x), y)


@pytest.mark.parametrize("fmt,kw", FMTS, ids=[f"{f}-{k}" for f, k in FMTS])
def test_backward_gives_dx_only(fmt: str, kw: dict) -> None:
    layer = _layer(fmt, kw)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    x.requires_grad_(True)
    dy = torch.randn(3, 48, generator=torch.Generator().manual_seed(3))
    (layer(x) * dy).sum().backward()
    # autograd through a plain matmul on the dequantized weight
    x2 = x.detach().clone().requires_grad_(True)
    w = layer.dequantize().requires_grad_(True)
    ((x2 @ w.T + layer.bias) * dy).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert list(layer.parameters()) == []
    for name, buf in layer.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name


def test_buffers_state_dict_and_to() -> None:
    layer = _layer("int4", {"group_size": 32, "symmetric": False})
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scale", "offset", "bias"}
    assert sd["qweight"].dtype == torch.int32
    x = torch.randn(4, 128)
    y = layer(x)
    layer.to(torch.float64)  # the bias changes dtype (the dense cache must be dropped); the
    assert layer.scale.dtype == sd["scale"].dtype  # quantized buffers keep their layout
    assert layer.bias.dtype == torch.float64
    assert torch.allclose(layer(x), y, rtol=1e-5, atol=1e-6)
    fresh = QuantLinear(
        quantize(torch.zeros(48, 128) + 0.01, "int4", group_size=32, symmetric=False),
        torch.zeros(48),
    )
    fresh.load_state_dict(_layer("int4", {"group_size": 32, "symmetric": False}).state_dict())
    assert torch.equal(fresh(x), y)


def test_cpu_cache_is_reused_per_dtype() -> None:
    layer = _layer("int4", {"group_size": 32})
    x = torch.randn(1, 128)
    layer(x)
    layer(x)
    layer(x.bfloat16())
    assert sorted(str(k[0]) for k in layer._dense) == ["torch.bfloat16", "torch.float32"]
    off = _layer("int4", {"group_size": 32}, cache_dequantized=False)
    off(x)
    assert off._dense == {}


def test_input_shape_error() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        _layer("int8", {"group_size": 64})(torch.randn(2, 64))
    with pytest.raises(ValueError, match="bias"):
        QuantLinear(quantize(torch.randn(4, 32), "int8", group_size=32), torch.zeros(5))


def test_name_matching() -> None:
    assert name_matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert not name_matches("model.layers.0.self_attn.q_proj_extra", "q_proj")
    assert name_matches("model.layers.1.mlp.experts.3.down_proj", "*.experts.*")
    assert name_matches("model.layers.1.mlp.down_proj", r"re:.*layers\.1\..*")
    assert not any(name_matches("lm_head", p) for p in DEFAULT_TARGETS)
    assert not any(name_matches("model.embed_tokens", p) for p in DEFAULT_TARGETS)


def test_replace_linear_in_module_list() -> None:
    seq = nn.ModuleList([nn.Linear(32, 8), nn.Linear(32, 8)])
    q = QuantLinear.from_linear(seq[1], "int8", group_size=32)
    replace_linear(seq, "1", q)
    assert seq[1] is q
    with pytest.raises(ValueError, match="no child"):
        replace_linear(seq, "7", q)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 32}), ("fp8", {}), ("nvfp4", {})])
def test_convert_linears_on_tiny_llama(fmt: str, kw: dict) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        float_logits = model(ids).logits
    # reference: the same model with each target weight replaced by its dequantized value
    ref_model = _tiny_llama()
    for name, mod in ref_model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            mod.weight.data = quantize(mod.weight.data, fmt, **kw).dequantize()
    n = convert_linears(model, fmt, **kw)
    assert n == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert all(
        not isinstance(m, nn.Linear) or name == "lm_head" for name, m in model.named_modules()
    )
    with torch.no_grad():
        logits = model(ids).logits
        ref = ref_model(ids).logits
    assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-5)
    assert float((logits - float_logits).norm() / float_logits.norm()) < 0.5  # still the same model
    # only the non-quantized parameters remain trainable tensors
    names = {k for k, _ in model.named_parameters()}
    assert not any("proj" in k for k in names)


def test_convert_linears_targets_and_errors() -> None:
    model = _tiny_llama()
    assert convert_linears(model, "int8", targets=["q_proj", "lm_head"], group_size=32) == 3
    assert isinstance(model.lm_head, QuantLinear)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*does not divide"):
        convert_linears(_tiny_llama(), "int4", targets=["down_proj"], group_size=48)
    with pytest.raises(TypeError, match="sequence"):
        convert_linears(_tiny_llama(), "int4", targets="q_proj")
    # a target that cannot be what the caller meant converts nothing silently no more
    for bad, msg in ((["q_proj "], "matches no module"), (["self_attn.qproj"], "matches no module"),
                     (["embed_tokens"], "matches only modules that are not linears"),
                     (["re:(k|v_proj"], "not a valid regular expression")):
        with pytest.raises(ValueError, match=msg):
            convert_linears(_tiny_llama(), "int8", targets=bad, group_size=32)
    # converting twice is still fine: the pattern names QuantLinears now
    assert convert_linears(model, "int8", targets=["q_proj"], group_size=32) == 0


def test_load_state_dict_refreshes_the_dense_cache() -> None:
    """On CPU a QuantLinear computes with a cached dense weight; loading new packed buffers
    must not leave the old one in use."""
    a = _layer("int8", {"group_size": 32})
    b = QuantLinear.from_linear(torch.nn.Linear(128, 48), "int8", group_size=32)
    x = torch.randn(3, 128)
    a(x)  # fills the cache
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x))


def test_w8a8_act_quant_forward_and_straight_through_backward() -> None:
    """act_quant='fp8' quantizes activations in forward (differs from W8A16) while the input
    gradient is the straight-through one (dY @ W with the dequantized weight)."""
    from orbit.kernels.dispatch import qmm
    from orbit.quant.linear import QuantLinear
    from orbit.quant.quantize import quantize

    torch.manual_seed(3)
    w = torch.randn(96, 256)
    qw = quantize(w, "fp8")
    lin = QuantLinear(qw)
    lin.act_quant = "fp8"
    x = torch.randn(5, 256, requires_grad=True)
    y = lin(x)
    ref = qmm(x.detach(), qw, act_quant="fp8")
    assert torch.equal(y.detach(), ref)
    w16 = x.detach() @ qw.dequantize().T
    assert not torch.equal(y.detach(), w16)  # activations really were quantized
    assert (y.detach() - w16).norm() / w16.norm() < 0.1
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.allclose(x.grad, dy @ qw.dequantize(), atol=1e-5)
    bad = QuantLinear(quantize(w, "int4", group_size=32))
    bad.act_quant = "fp8"
    with pytest.raises(ValueError, match="fp8 weight"):
        bad(x)


@pytest.mark.parametrize(("fmt", "kw"), [("int4", {"group_size": 32, "symmetric": False}),
                                         ("fp8", {}), ("nvfp4", {}), ("mxfp4", {})])
def test_dtype_casts_leave_the_frozen_weight_alone(fmt: str, kw: dict) -> None:
    """`model.to(torch.bfloat16)` / `.half()` cast every floating buffer; a QuantLinear's codes,
    scales and offsets keep their storage dtypes (the format's layout), so the weight it
    computes with does not change. The bias follows the cast."""
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(256, 64), fmt, **kw)
    before = q.dequantize().clone()
    dtypes = {n: b.dtype for n, b in q.named_buffers() if n != "bias"}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(q)
        assert {n: b.dtype for n, b in q.named_buffers() if n != "bias"} == dtypes
        assert torch.equal(q.dequantize(), before)
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
