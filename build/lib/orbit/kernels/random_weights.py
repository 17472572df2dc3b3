"""Random packed weights of every format, for kernel tests and benchmarks.

Kernels are checked on fresh random *packed* tensors (every bit pattern of the codes,
positive random scales) rather than on the output of a quantizer: that exercises every
nibble position and sign, never feeds zeros, and does not depend on `orbit.quant.quantize`.
"""

from __future__ import annotations

import torch

from orbit.quant.qweight import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP, QuantizedWeight


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=gen, device=gen.device) * (hi - lo) + lo


def random_qweight(fmt: str, out_f: int, in_f: int, *, group_size: int = 128,
                   asym: bool = False, scale_dtype: torch.dtype = torch.bfloat16,
                   offset_dtype: torch.dtype | None = None, seed: int = 0,
                   device: str | torch.device = "cpu") -> QuantizedWeight:
    """A `QuantizedWeight` of logical shape (out_f, in_f) with random codes and scales sized so
    that dequantized entries are O(0.05), like a trained linear's weights. `offset_dtype`
    (int4 with `asym`; default `scale_dtype`) lets scale and offset differ, as they do for
    `orbit.quant.quantize` (bf16 scale, fp32 offset)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)  # generate in place: big shapes on GPU
    dev = {"generator": gen, "device": device}
    if fmt == "bf16":
        t = {"weight": (torch.randn(out_f, in_f, **dev) * 0.05).to(torch.bfloat16)}
        return QuantizedWeight("bf16", (out_f, in_f), t)
    if fmt == "int4":
        words = torch.randint(-(2**31), 2**31, (out_f, in_f // 8), **dev, dtype=torch.int64)
        t = {"qweight": words.to(torch.int32),
             "scale": _uniform((out_f, in_f // group_size), 0.004, 0.012, gen).to(scale_dtype)}
        if asym:
            t["offset"] = (-8.0 * t["scale"].float() + _uniform(t["scale"].shape, -0.01, 0.01, gen)
                           ).to(offset_dtype or scale_dtype)
        return QuantizedWeight("int4", (out_f, in_f), t, group_size)
    if fmt == "int8":
        q = torch.randint(-128, 128, (out_f, in_f), **dev, dtype=torch.int32)
        t = {"qweight": q.to(torch.int8),
             "scale": _uniform((out_f, in_f // group_size), 2e-4, 6e-4, gen).to(scale_dtype)}
        return QuantizedWeight("int8", (out_f, in_f), t, group_size)
    if fmt == "fp8":
        nb = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
        t = {"weight": (torch.randn(out_f, in_f, **dev) * 100).clamp(-448, 448)
             .to(torch.float8_e4m3fn),
             "scale_inv": _uniform(nb, 2e-4, 8e-4, gen)}
        return QuantizedWeight("fp8", (out_f, in_f), t, FP8_BLOCK)
    if fmt in ("nvfp4", "mxfp4"):
        q = torch.randint(0, 256, (out_f, in_f // 2), **dev, dtype=torch.int32)
        t = {"qweight": q.to(torch.uint8)}
        if fmt == "nvfp4":
            t["scale"] = _uniform((out_f, in_f // NVFP4_GROUP), 0.5, 8.0, gen).to(torch.float8_e4m3fn)
            t["global_scale"] = torch.tensor(0.004, dtype=torch.float32, device=device)
            return QuantizedWeight("nvfp4", (out_f, in_f), t, NVFP4_GROUP)
        t["scale"] = torch.randint(119, 124, (out_f, in_f // MXFP4_GROUP), **dev,
                                   dtype=torch.int32).to(torch.uint8)
        return QuantizedWeight("mxfp4", (out_f, in_f), t, MXFP4_GROUP)
    raise ValueError(f"random_qweight: unknown format {fmt!r}")


def gemv_operands(qw: QuantizedWeight) -> tuple:
    """`qw`'s tensors as `orbit.kernels.gemv.gemv` takes them after x:
    (fmt, shape, packed codes, scales, offset or None, global scale or None, group)."""
    t = qw.tensors
    group = {"nvfp4": NVFP4_GROUP, "mxfp4": MXFP4_GROUP, "fp8": FP8_BLOCK}.get(qw.fmt,
                                                                            qw.group_size)
    gs = t["global_scale"].reshape(1) if qw.fmt == "nvfp4" else None
    return (qw.fmt, qw.shape, t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv")),
            t.get("offset"), gs, group)
