"""quantize() -> dequantize() for every base format: error bounds, packing, storage cost."""

from __future__ import annotations

import pytest
import torch

from orbit.quant.quantize import (
    e2m1_codes,
    nominal_bytes_per_param,
    pack_e2m1,
    quantize,
)
from orbit.quant.qweight import (
    E2M1_VALUES,
    FORMATS,
    QuantizedWeight,
    pack_int4,
    unpack_e2m1,
    unpack_int4,
)

# Relative Frobenius error bounds against float64 on Gaussian weights. Uniform int4 with
# group g has step ~ 2*amax/15 (asym) or amax/7 (sym); expected rel. error ~ step/sqrt(12)/sigma.
CASES = [
    ("bf16", {}, 0.004),
    ("int4", {"group_size": 32}, 0.12),
    ("int4", {"group_size": 64}, 0.13),
    ("int4", {"group_size": 128}, 0.14),
    ("int4", {"group_size": 32, "symmetric": False}, 0.11),
    ("int4", {"group_size": 128, "symmetric": False}, 0.12),
    ("int8", {"group_size": 32}, 0.008),
    ("int8", {"group_size": 128}, 0.009),
    ("fp8", {}, 0.035),
    ("nvfp4", {}, 0.11),
    ("mxfp4", {}, 0.13),
]


def _rel_err(qw: QuantizedWeight, w: torch.Tensor) -> float:
    ref = w.to(torch.float64)
    return float((qw.dequantize(torch.float64) - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt,kw,bound", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_quantize_error_bound(fmt: str, kw: dict, bound: float) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(192, 256, generator=g) * 0.02 + 0.003  # non-zero mean exercises asym
    qw = quantize(w, fmt, **kw)
    assert qw.fmt == fmt and qw.shape == (192, 256)
    err = _rel_err(qw, w)
    assert 0 < err < bound, (fmt, kw, err)


@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8", "nvfp4", "mxfp4"])
def test_requantizing_the_dequantized_weight_is_a_fixed_point(fmt: str) -> None:
    """Round-to-nearest of values already on the grid must return the same codes."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    qw = quantize(w, fmt, group_size=32 if fmt in ("int4", "int8") else None)
    d = qw.dequantize()
    qw2 = quantize(d, fmt, group_size=qw.group_size if fmt in ("int4", "int8") else None)
    assert torch.equal(qw2.dequantize(), d)


def test_fp8_edge_blocks_and_scale_inv() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g)
    w[150:, 260:] *= 50.0  # a corner (edge) block with a much larger range
    qw = quantize(w, "fp8")
    s = qw.tensors["scale_inv"]
    assert s.shape == (2, 3) and s.dtype == torch.float32
    assert torch.allclose(s[1, 2], w[128:, 256:].abs().max() / 448.0)
    assert qw.tensors["weight"].dtype == torch.float8_e4m3fn
    assert _rel_err(qw, w) < 0.035
    # the small-range blocks keep their own precision despite the big corner block
    assert (
        _rel_err(
            QuantizedWeight(
                "fp8",
                (128, 128),
                {"weight": qw.tensors["weight"][:128, :128], "scale_inv": s[:1, :1]},
                128,
            ),
            w[:128, :128],
        )
        < 0.035
    )


def test_nvfp4_global_scale_and_block_scale() -> None:
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    qw = quantize(w, "nvfp4")
    gs = qw.tensors["global_scale"]
    assert gs.dtype == torch.float32 and gs.dim() == 0
    assert torch.allclose(gs, w.abs().max() / (448 * 6), rtol=1e-6)
    assert qw.tensors["scale"].dtype == torch.float8_e4m3fn and qw.tensors["scale"].shape == (32, 4)
    assert qw.tensors["qweight"].shape == (32, 32)
    # the largest element of the tensor is represented exactly (6 * 448 * global_scale)
    i = w.abs().argmax()
    assert torch.allclose(qw.dequantize().flatten()[i], w.flatten()[i], rtol=1e-6)


def test_mxfp4_scale_is_ocp_shared_exponent() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    qw = quantize(w, "mxfp4")
    amax = w.reshape(16, 2, 32).abs().amax(-1)
    expect = torch.floor(torch.log2(amax)).to(torch.int32) - 2 + 127
    assert torch.equal(qw.tensors["scale"].to(torch.int32), expect)
    assert qw.tensors["scale"].dtype == torch.uint8


def test_int4_sym_codes_and_scale() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    qw = quantize(w, "int4", group_size=32)
    u = unpack_int4(qw.tensors["qweight"], 64)
    assert int(u.min()) >= 1 and int(u.max()) <= 15  # q in [-7, 7]; code 0 (q=-8) unused
    amax = w.reshape(8, 2, 32).abs().amax(-1)
    assert torch.equal(qw.tensors["scale"], (amax / 7).to(torch.bfloat16))


def test_int4_asym_offset_is_integer_zero_point() -> None:
    # skewed groups: the zero point shifts the grid (it must still contain 0 exactly, which
    # an integer zero point in 0..15 always does)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(7)) * 0.5 + 1.2
    qw = quantize(w, "int4", group_size=32, symmetric=False)
    s, off = qw.tensors["scale"].float(), qw.tensors["offset"]
    assert off.dtype == torch.float32
    zu = -off / s
    assert torch.equal(zu, torch.round(zu)) and int(zu.min()) >= 0 and int(zu.max()) <= 15
    assert int(zu.max()) > 0
    assert _rel_err(qw, w) < 0.6 * _rel_err(quantize(w, "int4", group_size=32), w)


def test_pack_int4_roundtrip_and_bit_order() -> None:
    u = torch.randint(0, 16, (5, 48), generator=torch.Generator().manual_seed(8))
    packed = pack_int4(u)
    assert packed.dtype == torch.int32 and packed.shape == (5, 6)
    assert torch.equal(unpack_int4(packed, 48), u.to(torch.int32))
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 3] = 0xA
    assert int(pack_int4(one)[0, 0]) == 0xA << 12  # element j at bits 4j..4j+3


def test_e2m1_rounding_and_packing() -> None:
    vals = torch.tensor(
        [
            [
                0.2,
                0.25,
                0.26,
                0.75,
                1.25,
                1.75,
                2.5,
                3.5,
                5.0,
                5.1,
                100.0,
                -0.74,
                -3.0,
                0.0,
                -0.1,
                6.0,
            ]
        ]
    )
    codes = e2m1_codes(vals)
    lut = torch.tensor(E2M1_VALUES)
    expect = [0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -3.0, 0.0, 0.0, 6.0]
    assert lut[codes.long()][0].tolist() == expect
    packed = pack_e2m1(codes)
    assert packed.shape == (1, 8)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(unpack_e2m1(packed), lut[codes.long()])


@pytest.mark.parametrize(
    "fmt,kw,expect",
    [
        ("bf16", {}, 2.0),
        ("int4", {"group_size": 32}, 0.5 + 2 / 32),
        ("int4", {"group_size": 128}, 0.5 + 2 / 128),
        ("int4", {"group_size": 128, "symmetric": False}, 0.5 + 6 / 128),
        ("int8", {"group_size": 128}, 1 + 2 / 128),
        ("fp8", {}, 1 + 4 / 128**2),
        ("nvfp4", {}, 0.5 + 1 / 16),
        ("mxfp4", {}, 0.5 + 1 / 32),
    ],
)
def test_bytes_per_param(fmt: str, kw: dict, expect: float) -> None:
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(9))
    qw = quantize(w, fmt, **kw)
    assert nominal_bytes_per_param(
        fmt, kw.get("group_size"), kw.get("symmetric", True)
    ) == pytest.approx(expect)
    extra = 4 / w.numel() if fmt == "nvfp4" else 0.0  # the fp32 global scale
    assert qw.bytes_per_param() == pytest.approx(expect + extra)


def test_all_formats_covered() -> None:
    assert {c[0] for c in CASES} == set(FORMATS)


@pytest.mark.parametrize(
    "w,fmt,kw,msg",
    [
        (torch.randn(4, 48), "int4", {"group_size": 32}, "does not divide"),
        (torch.randn(4, 40), "int4", {"group_size": 8, "symmetric": True}, None),
        (torch.randn(4, 36), "int4", {"group_size": 4}, "multiple of 8|% 8"),
        (torch.randn(4, 24), "nvfp4", {}, "does not divide"),
        (torch.randn(4, 48), "mxfp4", {}, "does not divide"),
        (torch.randn(4, 64), "nvfp4", {"group_size": 32}, "fixed group size"),
        (torch.randint(0, 5, (4, 64)), "int4", {}, "float"),
        (torch.randn(64), "int8", {}, "2-D"),
        (torch.randn(4, 64), "int3", {}, "unknown quantized format"),
        (torch.randn(4, 64), "int8", {"symmetric": False}, "only supported for int4"),
        (torch.full((4, 64), float("nan")), "int8", {"group_size": 64}, "NaN"),
    ],
)
def test_quantize_errors(w: torch.Tensor, fmt: str, kw: dict, msg: str | None) -> None:
    if msg is None:
        quantize(w, fmt, **kw)  # a valid odd group size must be accepted
        return
    with pytest.raises(ValueError, match=msg):
        quantize(w, fmt, **kw)


def test_zero_groups_dequantize_to_zero() -> None:
    w = torch.randn(128, 128, generator=torch.Generator().manual_seed(10))
    w[:, :32] = 0
    for fmt in FORMATS:
        d = (
            quantize(w, fmt).dequantize()
            if fmt not in ("int4", "int8")
            else quantize(w, fmt, group_size=32).dequantize()
        )
        assert torch.isfinite(d).all() and torch.equal(d[:, :32], torch.zeros(128, 32)), fmt


def test_quantized_weight_names_what_is_wrong_with_its_tensors() -> None:
    """Bad input to the in-memory format: a missing scale, a wrong dtype or shape, a group
    size that does not divide the input dim, an unknown tensor: a ValueError naming the tensor
    and the layout it should have."""
    import pytest

    from orbit.kernels.random_weights import random_qweight
    from orbit.quant.qweight import QuantizedWeight

    qw = random_qweight("int4", 8, 64, group_size=32)
    t = qw.tensors
    cases = {
        r"tensor 'scale' is missing \(expected float32 or float16 or bfloat16 of shape \(8, 2\)\)":
            ({"qweight": t["qweight"]}, 32),
        r"tensor 'qweight' is float32 \(8, 8\), expected int32": (dict(t, qweight=t["qweight"].float()), 32),
        r"tensor 'qweight' is int32 \(4, 8\), expected int32 of shape \(8, 8\)":
            (dict(t, qweight=t["qweight"][:4]), 32),
        r"group size 48 must be a positive divisor of the input dim 64": (t, 48),
        r"unknown tensor\(s\) \['zeros'\]": (dict(t, zeros=t["scale"]), 32),
    }
    for msg, (tensors, g) in cases.items():
        with pytest.raises(ValueError, match=r"int4 weight \[8 x 64\]: " + msg):
            QuantizedWeight("int4", (8, 64), tensors, g)
    fq = random_qweight("fp8", 8, 64)
    with pytest.raises(ValueError, match=r"tensor 'scale_inv' is bfloat16 .* expected float32"):
        QuantizedWeight("fp8", (8, 64), dict(fq.tensors, scale_inv=fq.tensors["scale_inv"].bfloat16()), 128)
    nq = random_qweight("nvfp4", 8, 64)
    with pytest.raises(ValueError, match=r"'global_scale' is .* expected float32 with one element"):
        QuantizedWeight("nvfp4", (8, 64), dict(nq.tensors, global_scale=torch.ones(2)), 16)
    with pytest.raises(ValueError, match="shape must be"):
        QuantizedWeight("int8", (8, 0), {}, 32)


def test_scales_that_leave_their_range_are_errors() -> None:
    """quantize() refuses inf/NaN input; it must not make them itself: fp16 scales of 1e6
    weights overflow, an NVFP4 global scale of 1e-37 weights underflows to 0."""
    import pytest

    from orbit.quant.quantize import quantize

    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="overflows its scale"):
        quantize(w * 1e6, "int4", group_size=32, symmetric=False, scale_dtype=torch.float16)
    with pytest.raises(ValueError, match="too small for a float32 global scale"):
        quantize(w * 1e-37, "nvfp4")
    assert quantize(torch.zeros(8, 64), "nvfp4").dequantize().abs().max() == 0  # zeros are fine
