"""Checkpoint readers/writers: bitwise round trips, the real compressed-tensors library, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from orbit.quant.checkpoint import read_linear, write_linear
from orbit.quant.qconfig import linear_scheme, quantization_config
from orbit.quant.quantize import quantize
from orbit.quant.qweight import QuantizedWeight

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import (  # noqa: E402
    MXFP4PackedCompressor,
    NVFP4PackedCompressor,
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

P = "model.layers.0.mlp.down_proj"


def _w(out_f: int = 44, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


def _bitwise_equal(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    if (a.fmt, a.shape, a.group_size, set(a.tensors)) != (
        b.fmt,
        b.shape,
        b.group_size,
        set(b.tensors),
    ):
        return False
    for k, x in a.tensors.items():
        y = b.tensors[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


ROUNDTRIP = [
    ("compressed-tensors", "int4", {"group_size": 32}),
    ("compressed-tensors", "int4", {"group_size": 128, "symmetric": False}),
    ("compressed-tensors", "int4", {"group_size": 64, "symmetric": False}),
    ("compressed-tensors", "nvfp4", {}),
    ("compressed-tensors", "mxfp4", {}),
    ("deepseek-fp8", "fp8", {}),
    ("modelopt", "nvfp4", {}),
    ("gpt-oss", "mxfp4", {}),
]


@pytest.mark.parametrize("style,fmt,kw", ROUNDTRIP, ids=[f"{s}-{f}-{k}" for s, f, k in ROUNDTRIP])
def test_roundtrip_bitwise_through_safetensors(tmp_path, style: str, fmt: str, kw: dict) -> None:
    qw = quantize(_w(out_f=300 if fmt == "fp8" else 44), fmt, **kw)
    cfg = quantization_config(
        style, fmt, group_size=kw.get("group_size"), symmetric=kw.get("symmetric", True)
    )
    tensors = write_linear(qw, P, style)
    save_file(tensors, str(tmp_path / "m.safetensors"))
    back = read_linear(load_file(str(tmp_path / "m.safetensors")), P, cfg)
    assert _bitwise_equal(back, qw)
    assert torch.equal(back.dequantize(), qw.dequantize())


def _ct_scheme(cfg: dict):
    qc = QuantizationConfig.model_validate(cfg)  # the library itself must accept our config
    return qc.config_groups["group_0"]


@pytest.mark.parametrize("symmetric,group", [(True, 32), (True, 128), (False, 32), (False, 128)])
def test_int4_checkpoint_decompressed_by_compressed_tensors(symmetric: bool, group: int) -> None:
    qw = quantize(_w(out_f=37, in_f=256, seed=1), "int4", group_size=group, symmetric=symmetric)
    cfg = quantization_config("compressed-tensors", "int4", group_size=group, symmetric=symmetric)
    local = {k[len(P) + 1 :]: v for k, v in write_linear(qw, P, "compressed-tensors").items()}
    out = PackedQuantizationCompressor.decompress(local, _ct_scheme(cfg))["weight"]
    assert out.dtype == torch.bfloat16
    # compressed-tensors computes (q - zp) * scale in the scale dtype: one rounding of the
    # exact value, which is what Orbit's float32 dequantize rounded to bf16 is.
    assert torch.equal(out, qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_compressed_by_compressed_tensors_reads_back_exactly(symmetric: bool) -> None:
    """Pack with the library (its zero-point packing and sign convention), read with Orbit."""
    qw = quantize(_w(out_f=29, in_f=128, seed=2), "int4", group_size=32, symmetric=symmetric)
    cfg = quantization_config("compressed-tensors", "int4", group_size=32, symmetric=symmetric)
    sd = {"weight": qw.dequantize(), "weight_scale": qw.tensors["scale"]}
    if not symmetric:
        zu = -qw.tensors["offset"] / qw.tensors["scale"].float()
        sd["weight_zero_point"] = (zu - 8).round().to(torch.int8)  # library zp is signed
    packed = PackedQuantizationCompressor.compress(sd, _ct_scheme(cfg))
    back = read_linear({f"{P}.{k}": v for k, v in packed.items()}, P, cfg)
    assert _bitwise_equal(back, qw)


def test_nvfp4_and_mxfp4_decompressed_by_compressed_tensors() -> None:
    w = _w(out_f=16, in_f=128, seed=3)
    for fmt, comp in (("nvfp4", NVFP4PackedCompressor), ("mxfp4", MXFP4PackedCompressor)):
        qw = quantize(w, fmt)
        cfg = quantization_config("compressed-tensors", fmt)
        local = {k[len(P) + 1 :]: v for k, v in write_linear(qw, P, "compressed-tensors").items()}
        out = comp.decompress(local, _ct_scheme(cfg))["weight"].float()
        ref = qw.dequantize()
        if fmt == "mxfp4":  # power-of-two scales: exact
            assert torch.equal(out, ref)
        else:  # the library divides by the inverted global scale and rounds it to bf16
            assert torch.allclose(out, ref, rtol=2**-7, atol=0)


def test_global_scale_stored_inverted() -> None:
    qw = quantize(_w(seed=4), "nvfp4")
    t = write_linear(qw, P, "compressed-tensors")
    inv = t[f"{P}.weight_global_scale"]
    assert inv.shape == (1,) and inv.dtype == torch.float32
    assert torch.allclose(inv * qw.tensors["global_scale"], torch.ones(1), rtol=1e-6)
    assert torch.equal(
        write_linear(qw, P, "modelopt")[f"{P}.weight_scale_2"], qw.tensors["global_scale"]
    )


def test_gpt_oss_stacked_experts() -> None:
    qws = [quantize(_w(out_f=8, in_f=64, seed=s), "mxfp4") for s in range(3)]
    parts = [write_linear(q, "model.layers.0.mlp.experts.gate_up_proj", "gpt-oss") for q in qws]
    stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    assert stacked["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (3, 8, 2, 16)
    cfg = quantization_config("gpt-oss", "mxfp4")
    for e, q in enumerate(qws):
        assert _bitwise_equal(
            read_linear(stacked, "model.layers.0.mlp.experts.gate_up_proj", cfg, expert=e), q
        )
    with pytest.raises(ValueError, match="expert"):
        read_linear(stacked, "model.layers.0.mlp.experts.gate_up_proj", cfg)


def test_ignored_and_unquantized_modules_read_as_bf16() -> None:
    cfg = quantization_config("compressed-tensors", "int4", group_size=32)
    w = _w(out_f=16, in_f=64).to(torch.bfloat16)
    qw = read_linear({"lm_head.weight": w}, "lm_head", cfg)
    assert qw.fmt == "bf16" and torch.equal(qw.tensors["weight"], w)
    assert read_linear({f"{P}.weight": w}, P, None).fmt == "bf16"
    assert linear_scheme("model.layers.3.self_attn.q_proj", cfg).fmt == "int4"


def test_targets_select_config_group() -> None:
    cfg = quantization_config(
        "compressed-tensors", "int4", group_size=32, targets=["re:.*experts.*"], ignore=[]
    )
    assert linear_scheme("model.layers.0.mlp.experts.3.down_proj", cfg).fmt == "int4"
    assert linear_scheme("model.layers.0.self_attn.q_proj", cfg).fmt == "bf16"


def _ct_int4_tensors(symmetric: bool = True) -> tuple[dict, dict]:
    qw = quantize(_w(out_f=16, in_f=64), "int4", group_size=32, symmetric=symmetric)
    cfg = quantization_config("compressed-tensors", "int4", group_size=32, symmetric=symmetric)
    return write_linear(qw, P, "compressed-tensors"), cfg


def test_missing_scale_is_a_clear_error() -> None:
    t, cfg = _ct_int4_tensors()
    del t[f"{P}.weight_scale"]
    with pytest.raises(ValueError, match=r"weight_scale' is missing"):
        read_linear(t, P, cfg)
    t, cfg = _ct_int4_tensors(symmetric=False)
    del t[f"{P}.weight_zero_point"]
    with pytest.raises(ValueError, match=r"weight_zero_point' is missing"):
        read_linear(t, P, cfg)
    fp8 = write_linear(quantize(_w(), "fp8"), P, "deepseek-fp8")
    del fp8[f"{P}.weight_scale_inv"]
    with pytest.raises(ValueError, match="weight_scale_inv"):
        read_linear(fp8, P, quantization_config("deepseek-fp8", "fp8"))


def test_wrong_dtype_and_shape_are_clear_errors() -> None:
    t, cfg = _ct_int4_tensors()
    bad = dict(t, **{f"{P}.weight_packed": t[f"{P}.weight_packed"].to(torch.int64)})
    with pytest.raises(ValueError, match="dtype torch.int64, expected torch.int32"):
        read_linear(bad, P, cfg)
    bad = dict(t, **{f"{P}.weight_scale": t[f"{P}.weight_scale"][:, :1]})
    with pytest.raises(ValueError, match="weight_scale' has shape"):
        read_linear(bad, P, cfg)
    nv = write_linear(quantize(_w(), "nvfp4"), P, "modelopt")
    nv[f"{P}.weight_scale"] = nv[f"{P}.weight_scale"].float()
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        read_linear(nv, P, quantization_config("modelopt", "nvfp4"))


def test_unsupported_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unsupported quantization_config.quant_method 'awq'"):
        read_linear({}, P, {"quant_method": "awq"})
    with pytest.raises(ValueError, match="weight_block_size"):
        linear_scheme(P, {"quant_method": "fp8", "weight_block_size": [1, 128]})
    cfg = quantization_config("compressed-tensors", "int4", group_size=32)
    cfg["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    with pytest.raises(ValueError, match="not supported"):
        linear_scheme(P, cfg)
    with pytest.raises(ValueError, match="cannot be written"):
        write_linear(quantize(_w(), "int8"), P, "compressed-tensors")
    with pytest.raises(ValueError, match="unknown checkpoint style"):
        quantization_config("awq", "int4")


def test_q4_1_style_offset_cannot_be_written_as_zero_point() -> None:
    qw = quantize(_w(out_f=8, in_f=64), "int4", group_size=32, symmetric=False)
    t = dict(qw.tensors, offset=qw.tensors["offset"] + 0.001)  # a float min, like GGUF Q4_1
    with pytest.raises(ValueError, match="zero point"):
        write_linear(QuantizedWeight("int4", qw.shape, t, 32), P, "compressed-tensors")


def test_any_compressed_tensors_global_scale_reads_and_writes_back_bitwise() -> None:
    """A library-written inverted global scale is arbitrary. float32 1/x is not injective, so
    write(read(ckpt)) may store a neighbouring float (<= 1 ulp) with the same reciprocal; what
    must hold is that it reads back to the identical Orbit weight."""
    qw = quantize(_w(out_f=4, in_f=32), "nvfp4")
    t = write_linear(qw, P, "compressed-tensors")
    cfg = quantization_config("compressed-tensors", "nvfp4")
    amax = torch.rand(300, generator=torch.Generator().manual_seed(5)) * 10 + 1e-3
    for inv in (448.0 * 6.0 / amax).to(torch.float32):
        t[f"{P}.weight_global_scale"] = inv.reshape(1)
        first = read_linear(t, P, cfg)
        back = write_linear(first, P, "compressed-tensors")
        assert _bitwise_equal(read_linear(back, P, cfg), first)
        ulps = back[f"{P}.weight_global_scale"].view(torch.int32) - inv.reshape(1).view(torch.int32)
        assert int(ulps.abs()) <= 1


def test_fp4_packed_by_compressed_tensors_matches_orbit_bytes() -> None:
    """The library packs Orbit's dequantized values with Orbit's scales into the same bytes
    (nibble order, sign bit, E8M0 and inverted-global-scale conventions all agree)."""
    w = _w(out_f=24, in_f=128, seed=6)
    for fmt, comp in (("nvfp4", NVFP4PackedCompressor), ("mxfp4", MXFP4PackedCompressor)):
        qw = quantize(w, fmt)
        ours = write_linear(qw, P, "compressed-tensors")
        sd = {"weight": qw.dequantize()}
        if fmt == "nvfp4":
            sd["weight_scale"] = qw.tensors["scale"].float()
            sd["weight_global_scale"] = ours[f"{P}.weight_global_scale"]
        else:
            sd["weight_scale"] = torch.exp2(qw.tensors["scale"].float() - 127)
        cfg = quantization_config("compressed-tensors", fmt)
        packed = comp.compress(sd, _ct_scheme(cfg))
        assert torch.equal(packed["weight_packed"], ours[f"{P}.weight_packed"]), fmt
        assert torch.equal(packed["weight_scale"], ours[f"{P}.weight_scale"]), fmt


def test_gpt_oss_blocks_match_transformers_dequantization() -> None:
    """transformers' own gpt-oss MXFP4 decoder reads Orbit's `_blocks`/`_scales` exactly."""
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    qws = [quantize(_w(out_f=16, in_f=96, seed=s), "mxfp4") for s in range(2)]
    parts = [write_linear(q, "e.down_proj", "gpt-oss") for q in qws]
    blocks = torch.stack([p["e.down_proj_blocks"] for p in parts])  # [E, out, in/32, 16]
    scales = torch.stack([p["e.down_proj_scales"] for p in parts])  # [E, out, in/32]
    dense = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    assert torch.equal(dense, torch.stack([q.dequantize().T for q in qws]))


def test_modelopt_exclude_globs() -> None:
    cfg = quantization_config("modelopt", "nvfp4", ignore=["*lm_head*", "model.layers.0.*"])
    assert linear_scheme("lm_head", cfg).fmt == "bf16"
    assert linear_scheme("model.layers.0.self_attn.q_proj", cfg).fmt == "bf16"
    assert linear_scheme("model.layers.1.self_attn.q_proj", cfg).fmt == "nvfp4"


def test_malformed_tensors_and_configs_name_the_problem() -> None:
    """A 1-D FP8 weight, an expert index past a stacked gpt-oss tensor, a group strategy
    without a usable group size: ValueErrors naming the tensor or config field (an IndexError,
    KeyError or TypeError before)."""
    p = "model.layers.0.mlp.down_proj"
    w = torch.randn(44, 256)
    t = write_linear(quantize(w, "fp8"), p, "deepseek-fp8")
    flat = {p + ".weight": t[p + ".weight"].reshape(-1), p + ".weight_scale_inv": t[p + ".weight_scale_inv"]}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' must be 2-D"):
        read_linear(flat, p, quantization_config("deepseek-fp8", "fp8"))
    g = write_linear(quantize(w, "mxfp4"), p, "gpt-oss")
    stk = {p + "_blocks": torch.stack([g[p + "_blocks"]] * 2),
           p + "_scales": torch.stack([g[p + "_scales"]] * 2)}
    with pytest.raises(ValueError, match="expert 5 is not among their 2 experts"):
        read_linear(stk, p, quantization_config("gpt-oss", "mxfp4"), expert=5)
    for bad in ("<missing>", None, 0, -1, "32"):
        cfg = quantization_config("compressed-tensors", "int4", group_size=32)
        wts = cfg["config_groups"]["group_0"]["weights"]
        if bad == "<missing>":
            del wts["group_size"]
        else:
            wts["group_size"] = bad
        with pytest.raises(ValueError, match=r"config_groups.group_0.weights.group_size must be a "
                                             r"positive integer"):
            linear_scheme(p, cfg)
