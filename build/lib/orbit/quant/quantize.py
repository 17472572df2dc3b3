"""Round-to-nearest quantization of a float weight into every Orbit base format.

This is how a BF16 checkpoint becomes a frozen low-precision base (`orbit quantize`, or
`convert_linears` at load time). It is deliberately simple (no calibration, no GPTQ): the
scales are min/max statistics of each group or block and every element rounds to nearest.
Layouts are the ones in docs/architecture.md; choices are recorded in docs/precision.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.quant.qweight import (
    FORMATS,
    FP8_BLOCK,
    MXFP4_GROUP,
    NVFP4_GROUP,
    QuantizedWeight,
    pack_int4,
)

DEFAULT_GROUP_SIZE = {"int4": 128, "int8": 128}
FIXED_GROUP_SIZE = {"bf16": 0, "fp8": FP8_BLOCK, "nvfp4": NVFP4_GROUP, "mxfp4": MXFP4_GROUP}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
E2M1_MAX = 6.0


def resolve_group_size(fmt: str, group_size: int | None) -> int:
    """The group size `fmt` will use: the default when None, the format's own when fixed."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")
    if fmt in FIXED_GROUP_SIZE:
        fixed = FIXED_GROUP_SIZE[fmt]
        if group_size not in (None, fixed):
            raise ValueError(f"format {fmt!r} has a fixed group size of {fixed}, got {group_size}")
        return fixed
    g = DEFAULT_GROUP_SIZE[fmt] if group_size is None else int(group_size)
    if g <= 0:
        raise ValueError(f"group_size must be positive, got {g}")
    return g


def nominal_bytes_per_param(
    fmt: str, group_size: int | None = None, symmetric: bool = True
) -> float:
    """Storage per weight element, ignoring edge blocks and the per-tensor scalar (planning)."""
    g = resolve_group_size(fmt, group_size)
    if fmt == "bf16":
        return 2.0
    if fmt == "int4":
        return 0.5 + 2.0 / g + (0.0 if symmetric else 4.0 / g)  # bf16 scale, fp32 offset
    if fmt == "int8":
        return 1.0 + 2.0 / g
    if fmt == "fp8":
        return 1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK)
    if fmt == "nvfp4":
        return 0.5 + 1.0 / NVFP4_GROUP
    return 0.5 + 1.0 / MXFP4_GROUP  # mxfp4


def _check_weight(w: Tensor, name: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"{name}: expected a float32/float16/bfloat16 weight, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name}: empty weight of shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name}: weight contains inf or NaN")


def _groups(w: Tensor, g: int, name: str) -> Tensor:
    out_f, in_f = w.shape
    if in_f % g:
        raise ValueError(f"{name}: group size {g} does not divide in_features {in_f}")
    return w.reshape(out_f, in_f // g, g)  # [out, n_groups, g]


def e2m1_codes(x: Tensor) -> Tensor:
    """Round float32 values (already divided by their scale) to E2M1 codes, nearest-even.

    Out-of-range values saturate to +-6. Ties go to the even mantissa, which for this grid
    means: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (the same thresholds
    compressed-tensors uses).
    """
    a = x.abs()
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    sign = ((x < 0) & (mag > 0)).to(torch.uint8) << 3  # never emit -0
    return mag | sign


def pack_e2m1(codes: Tensor) -> Tensor:
    """uint8 codes [out, in] (in even) -> uint8 [out, in/2], even column in the low nibble."""
    out_f, in_f = codes.shape
    if in_f % 2:
        raise ValueError(f"E2M1 packing needs an even in_features, got {in_f}")
    pairs = codes.reshape(out_f, in_f // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def zero_point_to_offset(zu: Tensor, scale: Tensor) -> Tensor:
    """Unsigned integer zero point (0..15) -> the float32 offset of Orbit's asym int4.

    `-(zu * scale)` is exact in float32 (4-bit times <=11-bit mantissa), so
    `u * scale + offset == (u - zu) * scale` exactly, whatever the scale dtype.
    """
    return -(zu.to(torch.float32) * scale.to(torch.float32))


def offset_to_zero_point(offset: Tensor, scale: Tensor, name: str) -> Tensor:
    """Inverse of `zero_point_to_offset`; ValueError when the offset is not -zu*scale."""
    s = scale.to(torch.float32)
    zu = torch.round(-offset.to(torch.float32) / torch.where(s == 0, torch.ones_like(s), s))
    zu = zu.clamp(0, 15)
    if not torch.equal(zero_point_to_offset(zu, scale), offset.to(torch.float32)):
        raise ValueError(
            f"{name}: int4 offset is not an integer zero point times the scale (e.g. a GGUF "
            "Q4_1 min); it cannot be stored as a compressed-tensors zero point"
        )
    return zu.to(torch.int64)


def _quantize_int4(
    w: Tensor, g: int, symmetric: bool, scale_dtype: torch.dtype
) -> dict[str, Tensor]:
    wg = _groups(w, g, "int4 weight")  # [out, n_groups, g]
    if symmetric:
        # amax/7 keeps +-amax exactly representable; code 0 (q=-8) stays unused, the
        # compressed-tensors convention (amax/7.5) would clip +amax instead.
        scale = (wg.abs().amax(-1) / 7.0).to(scale_dtype)
        s = scale.to(torch.float32)
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(wg / s.unsqueeze(-1)).clamp_(-8, 7)
        return {"qweight": pack_int4((q + 8).reshape(w.shape)), "scale": scale}
    # Asymmetric: integer zero point zu (so the weight can be written as a compressed-tensors
    # zero point), stored as the exact float32 offset -zu * scale.
    lo = wg.amin(-1).clamp(max=0.0)
    hi = wg.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).to(scale_dtype)
    s = scale.to(torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    zu = torch.round(-lo / s).clamp_(0, 15)
    u = (torch.round(wg / s.unsqueeze(-1)) + zu.unsqueeze(-1)).clamp_(0, 15)
    offset = zero_point_to_offset(zu, scale)
    return {"qweight": pack_int4(u.reshape(w.shape)), "scale": scale, "offset": offset}


def _quantize_int8(w: Tensor, g: int, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    wg = _groups(w, g, "int8 weight")  # [out, n_groups, g]
    scale = (wg.abs().amax(-1) / 127.0).to(scale_dtype)
    s = scale.to(torch.float32)
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(wg / s.unsqueeze(-1)).clamp_(-127, 127)
    return {"qweight": q.reshape(w.shape).to(torch.int8), "scale": scale}


def _quantize_fp8(w: Tensor) -> dict[str, Tensor]:
    out_f, in_f = w.shape
    bo, bi = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    # Pad with zeros to whole 128x128 blocks; padding cannot raise a block's amax.
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK, dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w
    blocks = padded.reshape(bo, FP8_BLOCK, bi, FP8_BLOCK)  # [bo, 128, bi, 128]
    amax = blocks.abs().amax(dim=(1, 3))  # [bo, bi]
    scale_inv = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
    q = (blocks / scale_inv[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = q.reshape(bo * FP8_BLOCK, bi * FP8_BLOCK)[:out_f, :in_f]
    return {"weight": q.to(torch.float8_e4m3fn).contiguous(), "scale_inv": scale_inv}


def nvfp4_global_scale(amax: Tensor) -> Tensor:
    """float32 [] global scale ~= amax / (448 * 6), chosen as the float32 reciprocal of
    compressed-tensors' stored (inverted) global scale so both representations round-trip."""
    amax = amax.to(torch.float32)
    inv = torch.where(amax == 0, torch.ones_like(amax), (FP8_MAX * E2M1_MAX) / amax)
    return 1.0 / inv


def _quantize_nvfp4(w: Tensor) -> dict[str, Tensor]:
    wg = _groups(w, NVFP4_GROUP, "nvfp4 weight")  # [out, in/16, 16]
    gscale = nvfp4_global_scale(w.abs().amax())
    block = (wg.abs().amax(-1) / E2M1_MAX / gscale).clamp_(max=FP8_MAX)
    scale = block.to(torch.float8_e4m3fn)
    eff = scale.to(torch.float32) * gscale  # the scale dequant will multiply by
    eff = torch.where(eff == 0, torch.ones_like(eff), eff)
    codes = e2m1_codes(wg / eff.unsqueeze(-1)).reshape(w.shape)
    return {"qweight": pack_e2m1(codes), "scale": scale, "global_scale": gscale}


def _quantize_mxfp4(w: Tensor) -> dict[str, Tensor]:
    wg = _groups(w, MXFP4_GROUP, "mxfp4 weight")  # [out, in/32, 32]
    amax = wg.abs().amax(-1)
    # OCP MX rule: shared exponent = floor(log2(amax)) - emax(E2M1) with emax = 2, so the
    # largest element lands in [4, 8) and saturates to 6 when above it.
    exp = torch.floor(torch.log2(torch.where(amax == 0, torch.ones_like(amax), amax))) - 2
    biased = (exp + 127).clamp_(0, 254)  # 255 is the E8M0 NaN
    scale = torch.exp2(biased - 127)
    codes = e2m1_codes(wg / scale.unsqueeze(-1)).reshape(w.shape)
    return {"qweight": pack_e2m1(codes), "scale": biased.to(torch.uint8)}


def quantize(
    w: Tensor,
    fmt: str,
    group_size: int | None = None,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    """Quantize a float weight [out, in] to `fmt` with round-to-nearest.

    `group_size` applies to int4/int8 (default 128; must divide in_features); fp8, nvfp4 and
    mxfp4 have fixed blocks (128x128, 16, 32). `symmetric=False` is int4 only. `scale_dtype`
    is the dtype of int4/int8 scales (bf16, as compressed-tensors writes; fp16 for GGUF).
    """
    _check_weight(w, "weight")
    g = resolve_group_size(fmt, group_size)
    if not symmetric and fmt != "int4":
        raise ValueError(f"asymmetric quantization is only supported for int4, not {fmt!r}")
    if scale_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be bf16, fp16 or fp32, got {scale_dtype}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    with torch.no_grad():
        w32 = w.detach().to(torch.float32)
        if fmt == "bf16":
            tensors = {"weight": w.detach().to(torch.bfloat16).contiguous()}
        elif fmt == "int4":
            if shape[1] % 8:
                raise ValueError(f"int4 needs in_features % 8 == 0, got {shape[1]}")
            tensors = _quantize_int4(w32, g, symmetric, scale_dtype)
        elif fmt == "int8":
            tensors = _quantize_int8(w32, g, scale_dtype)
        elif fmt == "fp8":
            tensors = _quantize_fp8(w32)
        elif fmt == "nvfp4":
            tensors = _quantize_nvfp4(w32)
        else:
            tensors = _quantize_mxfp4(w32)
        _check_scales(fmt, tensors, scale_dtype)
    return QuantizedWeight(fmt, shape, {k: v.contiguous() for k, v in tensors.items()}, g)


def _check_scales(fmt: str, tensors: dict[str, Tensor], scale_dtype: torch.dtype) -> None:
    """ValueError where the scales themselves leave their dtype's range (weights of ~1e6 in
    fp16 scales overflow to inf; NVFP4's global scale underflows to 0 below ~1e-35): the
    weight would dequantize to NaN or zeros without a word."""
    for name in ("scale", "offset", "scale_inv", "global_scale"):
        t = tensors.get(name)
        if t is None or not t.is_floating_point():
            continue
        f = t.to(torch.float32)
        if not bool(torch.isfinite(f).all()):
            raise ValueError(f"{fmt}: the weight's magnitude overflows its {name} "
                             f"({t.dtype}; scale_dtype={scale_dtype}); use float32 scales")
        if name == "global_scale" and not bool((f > 0).all()):
            raise ValueError(f"{fmt}: the weight's magnitude is too small for a float32 global "
                             "scale (it underflows to 0)")
