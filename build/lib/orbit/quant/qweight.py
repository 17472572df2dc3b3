"""The in-memory form of a frozen base weight, and its plain-PyTorch dequantization.

Every format Orbit computes with is a `QuantizedWeight`: a small bag of packed tensors plus
the logical `[out, in]` shape. `dequantize` here is *the* reference: GPU kernels are tested
against it, and on CPU it is the compute path itself. Layouts are documented in
docs/architecture.md and docs/precision.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

FORMATS = ("bf16", "int4", "int8", "fp8", "nvfp4", "mxfp4")

# E2M1 code -> value; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_BLOCK = 128
NVFP4_GROUP = 16
MXFP4_GROUP = 32


@dataclass(frozen=True)
class QuantizedWeight:
    """Packed tensors of one frozen linear weight of logical shape `shape` = (out, in)."""

    fmt: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor] = field(hash=False)
    group_size: int = 0

    def __post_init__(self) -> None:
        check_layout(self.fmt, self.shape, self.tensors, self.group_size)

    @classmethod
    def trusted(cls, fmt: str, shape: tuple[int, int], tensors: dict[str, Tensor],
                group_size: int = 0) -> QuantizedWeight:
        """Without the layout check: for the buffers of a module that checked them when it
        was built (QuantLinear makes one of these per forward call)."""
        obj = object.__new__(cls)
        for k, v in (("fmt", fmt), ("shape", shape), ("tensors", tensors),
                     ("group_size", group_size)):
            object.__setattr__(obj, k, v)
        return obj

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bytes_per_param(self) -> float:
        return self.nbytes() / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.fmt, self.shape, {k: v.to(device) for k, v in self.tensors.items()}, self.group_size
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self).to(dtype)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layout(fmt: str, shape: tuple[int, int], group_size: int
           ) -> dict[str, tuple[tuple[torch.dtype, ...], tuple[int, ...] | None, bool]]:
    """Tensor name -> (allowed dtypes, shape or None for a one-element scalar, required) of a
    `fmt` weight of logical shape (out, in): the packed layouts of docs/precision.md."""
    out_f, in_f = shape
    g = group_size
    if fmt == "bf16":
        return {"weight": (_FLOATS, (out_f, in_f), True)}
    if fmt == "int4":
        return {"qweight": ((torch.int32,), (out_f, _cdiv(in_f, 8)), True),
                "scale": (_FLOATS, (out_f, in_f // g), True),
                "offset": (_FLOATS, (out_f, in_f // g), False)}
    if fmt == "int8":
        return {"qweight": ((torch.int8,), (out_f, in_f), True),
                "scale": (_FLOATS, (out_f, in_f // g), True)}
    if fmt == "fp8":
        return {"weight": ((torch.float8_e4m3fn,), (out_f, in_f), True),
                "scale_inv": ((torch.float32,), (_cdiv(out_f, FP8_BLOCK), _cdiv(in_f, FP8_BLOCK)),
                              True)}
    if fmt == "nvfp4":
        return {"qweight": ((torch.uint8,), (out_f, _cdiv(in_f, 2)), True),
                "scale": ((torch.float8_e4m3fn,), (out_f, _cdiv(in_f, NVFP4_GROUP)), True),
                "global_scale": ((torch.float32,), None, True)}
    return {"qweight": ((torch.uint8,), (out_f, _cdiv(in_f, 2)), True),  # mxfp4
            "scale": ((torch.uint8,), (out_f, _cdiv(in_f, MXFP4_GROUP)), True)}


def check_layout(fmt: str, shape: tuple[int, int], tensors: dict[str, Tensor],
                 group_size: int) -> None:
    """ValueError naming the tensor and the expected layout for anything a `fmt` weight of
    `shape` cannot be: an unknown format, a missing or unknown tensor, a wrong dtype or shape,
    a group size (int4/int8) that does not divide the input dim."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r}; expected one of {FORMATS}")
    if (len(shape) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                   for v in shape)):
        raise ValueError(f"{fmt} weight: shape must be (out, in) positive ints, got {shape!r}")
    out_f, in_f = shape
    what = f"{fmt} weight [{out_f} x {in_f}]"
    if fmt in ("int4", "int8") and (not isinstance(group_size, int) or group_size <= 0
                                    or in_f % group_size):
        raise ValueError(f"{what}: group size {group_size!r} must be a positive divisor of the "
                         f"input dim {in_f} (one scale per group of inputs per row)")
    want = layout(fmt, shape, group_size)
    unknown = sorted(set(tensors) - set(want))
    if unknown:
        raise ValueError(f"{what}: unknown tensor(s) {unknown}; the layout is {sorted(want)}")
    for name, (dtypes, tshape, required) in want.items():
        t = tensors.get(name)
        if t is None:
            if required:
                raise ValueError(f"{what}: tensor {name!r} is missing (expected "
                                 f"{_describe(dtypes, tshape)})")
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{what}: tensor {name!r} is a {type(t).__name__}, not a tensor")  # noqa: TRY004
        ok_shape = t.numel() == 1 if tshape is None else tuple(t.shape) == tshape
        if t.dtype not in dtypes or not ok_shape:
            got = str(t.dtype).removeprefix("torch.")
            raise ValueError(f"{what}: tensor {name!r} is {got} {tuple(t.shape)}, expected "
                             f"{_describe(dtypes, tshape)}")


def _describe(dtypes: tuple[torch.dtype, ...], tshape: tuple[int, ...] | None) -> str:
    d = " or ".join(str(x).removeprefix("torch.") for x in dtypes)
    return f"{d} with one element" if tshape is None else f"{d} of shape {tshape}"


def unpack_int4(qweight: Tensor, in_features: int) -> Tensor:
    """int32 [out, in/8] -> uint8-valued int32 [out, in]; element j of a word at bits 4j..4j+3."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)  # [8]
    nib = (qweight.unsqueeze(-1) >> shifts) & 0xF  # [out, in/8, 8]
    return nib.reshape(qweight.shape[0], -1)[:, :in_features]


def pack_int4(u: Tensor) -> Tensor:
    """Unsigned nibbles [out, in] (values 0..15, in % 8 == 0) -> int32 [out, in/8]."""
    out, inf = u.shape
    if inf % 8:
        raise ValueError(f"int4 packing needs in_features % 8 == 0, got {inf}")
    u = u.to(torch.int64).reshape(out, inf // 8, 8)
    shifts = torch.arange(0, 32, 4, device=u.device, dtype=torch.int64)
    word = (u << shifts).sum(-1)  # [out, in/8] in 0..2^32-1
    word = torch.where(word >= 2**31, word - 2**32, word)
    return word.to(torch.int32)


def unpack_e2m1(packed: Tensor) -> Tensor:
    """uint8 [out, in/2] -> float32 [out, in]; even column in the low nibble."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    p = packed.to(torch.int64)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(packed.shape[0], -1)
    return lut[codes]


def _expand_groups(scale: Tensor, group: int, in_features: int) -> Tensor:
    return scale.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]


def dequantize(qw: QuantizedWeight) -> Tensor:
    """Reference dequantization to float32 [out, in]."""
    out_f, in_f = qw.shape
    t = qw.tensors
    if qw.fmt == "bf16":
        return t["weight"].to(torch.float32)
    if qw.fmt == "int4":
        u = unpack_int4(t["qweight"], in_f).to(torch.float32)
        scale = _expand_groups(t["scale"], qw.group_size, in_f)
        if "offset" in t:
            return u * scale + _expand_groups(t["offset"], qw.group_size, in_f)
        return (u - 8.0) * scale
    if qw.fmt == "int8":
        return t["qweight"].to(torch.float32) * _expand_groups(t["scale"], qw.group_size, in_f)
    if qw.fmt == "fp8":
        s = t["scale_inv"].to(torch.float32)
        s = s.repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
        return t["weight"].to(torch.float32) * s
    if qw.fmt == "nvfp4":
        v = unpack_e2m1(t["qweight"])[:, :in_f]
        s = _expand_groups(t["scale"], NVFP4_GROUP, in_f)
        return v * s * t["global_scale"].to(torch.float32)
    if qw.fmt == "mxfp4":
        v = unpack_e2m1(t["qweight"])[:, :in_f]
        e = t["scale"].to(torch.int32) - 127
        s = torch.exp2(e.to(torch.float32)).repeat_interleave(MXFP4_GROUP, dim=1)[:, :in_f]
        return v * s
    raise AssertionError(qw.fmt)
