"""Read quantized linears from checkpoint tensors into `QuantizedWeight`s, and write them back.

Published low-precision checkpoints are loaded as they are stored (no requantization), so the
model Orbit trains on is bit for bit the one that gets deployed, and an Orbit-quantized base can
be written in a format vLLM / SGLang / transformers read. The config side is in qconfig.py.

Tensor names per linear `<p>` (see docs/precision.md, "Formats"):
- compressed-tensors INT4: `<p>.weight_packed` int32 [out, in/8], `<p>.weight_scale`,
  `<p>.weight_shape` int64 [2], asym: `<p>.weight_zero_point` int32 [ceil(out/8), in/g]
  (nibbles zp+8 packed along dim 0);
- compressed-tensors NVFP4: `<p>.weight_packed` uint8, `<p>.weight_scale` fp8,
  `<p>.weight_global_scale` fp32 [1] = 1 / Orbit's global_scale;
- compressed-tensors MXFP4: `<p>.weight_packed` uint8, `<p>.weight_scale` uint8 E8M0;
- DeepSeek FP8: `<p>.weight` float8_e4m3fn, `<p>.weight_scale_inv` fp32
  [ceil(out/128), ceil(in/128)];
- ModelOpt NVFP4: `<p>.weight` uint8, `<p>.weight_scale` fp8, `<p>.weight_scale_2` fp32 [];
- gpt-oss MXFP4: `<p>_blocks` uint8 [(E,) out, in/32, 16], `<p>_scales` uint8 [(E,) out, in/32].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from orbit.quant.qconfig import LinearScheme, linear_scheme
from orbit.quant.quantize import offset_to_zero_point, zero_point_to_offset
from orbit.quant.qweight import QuantizedWeight, pack_int4, unpack_int4


def _get(
    tensors: Mapping[str, Tensor], key: str, dtype: torch.dtype | tuple | None, shape: tuple | None
) -> Tensor:
    if key not in tensors:
        raise ValueError(f"checkpoint tensor {key!r} is missing")
    t = tensors[key]
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if dtype is not None and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"checkpoint tensor {key!r} has dtype {t.dtype}, expected {want}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
        )
    return t


_FLOAT_SCALE = (torch.bfloat16, torch.float16, torch.float32)


def _read_ct_int4(tensors: Mapping[str, Tensor], p: str, sch: LinearScheme) -> QuantizedWeight:
    ws = _get(tensors, f"{p}.weight_shape", None, (2,))
    out_f, in_f = (int(v) for v in ws.tolist())
    if in_f % 8:
        raise ValueError(f"{p}: INT4 in_features {in_f} is not a multiple of 8")
    g = sch.group_size or in_f
    if in_f % g:
        raise ValueError(f"{p}: group size {g} does not divide in_features {in_f}")
    packed = _get(tensors, f"{p}.weight_packed", torch.int32, (out_f, in_f // 8))
    scale = _get(tensors, f"{p}.weight_scale", _FLOAT_SCALE, (out_f, in_f // g))
    if f"{p}.weight_g_idx" in tensors:
        g_idx = tensors[f"{p}.weight_g_idx"]
        if not torch.equal(g_idx.to(torch.int64), torch.arange(in_f) // g):
            raise ValueError(
                f"{p}.weight_g_idx: activation-order (act_order) group indices are not supported"
            )
    out = {"qweight": packed.contiguous(), "scale": scale.contiguous()}
    if sch.symmetric and f"{p}.weight_zero_point" in tensors:
        raise ValueError(f"checkpoint tensor {p + '.weight_zero_point'!r} is present but the "
                         "quantization_config says symmetric: true; reading it as symmetric "
                         "would drop the zero points (fix the config's weights.symmetric)")
    if not sch.symmetric:
        zp = _get(tensors, f"{p}.weight_zero_point", torch.int32, ((out_f + 7) // 8, in_f // g))
        zu = unpack_int4(zp.T.contiguous(), out_f).T  # [out, in/g] unsigned zero points
        out["offset"] = zero_point_to_offset(zu, scale).contiguous()
    return QuantizedWeight("int4", (out_f, in_f), out, g)


def _nvfp4_shape(packed: Tensor, key: str) -> tuple[int, int]:
    if packed.dim() != 2:
        raise ValueError(f"checkpoint tensor {key!r} must be 2-D, got shape {tuple(packed.shape)}")
    return int(packed.shape[0]), int(packed.shape[1]) * 2


def _read_fp4(tensors: Mapping[str, Tensor], p: str, sch: LinearScheme) -> QuantizedWeight:
    wkey = f"{p}.weight" if sch.style == "modelopt" else f"{p}.weight_packed"
    packed = _get(tensors, wkey, torch.uint8, None)
    out_f, in_f = _nvfp4_shape(packed, wkey)
    g = 16 if sch.fmt == "nvfp4" else 32
    if in_f % g:
        raise ValueError(f"{wkey}: in_features {in_f} is not a multiple of the {sch.fmt} block {g}")
    if sch.fmt == "mxfp4":
        scale = _get(tensors, f"{p}.weight_scale", torch.uint8, (out_f, in_f // g))
        return QuantizedWeight("mxfp4", (out_f, in_f), {"qweight": packed, "scale": scale}, g)
    scale = _get(tensors, f"{p}.weight_scale", torch.float8_e4m3fn, (out_f, in_f // g))
    if sch.style == "modelopt":
        gkey = f"{p}.weight_scale_2"
        gs = _get(tensors, gkey, torch.float32, None)
    else:
        gkey = f"{p}.weight_global_scale"
        gs = _get(tensors, gkey, torch.float32, None)
    if gs.numel() != 1:
        raise ValueError(
            f"checkpoint tensor {gkey!r} must hold one value, got shape {tuple(gs.shape)}"
        )
    gs = gs.reshape(())
    if sch.style != "modelopt":
        gs = 1.0 / gs  # compressed-tensors stores the inverse (448*6/amax)
    tensors_out = {"qweight": packed, "scale": scale, "global_scale": gs.clone()}
    return QuantizedWeight("nvfp4", (out_f, in_f), tensors_out, g)


def _read_gpt_oss(tensors: Mapping[str, Tensor], p: str, expert: int | None) -> QuantizedWeight:
    blocks = _get(tensors, f"{p}_blocks", torch.uint8, None)
    scales = _get(tensors, f"{p}_scales", torch.uint8, None)
    if blocks.dim() == 4:
        if expert is None:
            raise ValueError(f"{p}_blocks holds {blocks.shape[0]} experts; pass expert=<index>")
        if not 0 <= expert < blocks.shape[0] or scales.dim() != 3 or scales.shape[0] != blocks.shape[0]:
            raise ValueError(f"{p}_blocks {tuple(blocks.shape)} / {p}_scales "
                             f"{tuple(scales.shape)}: expert {expert} is not among their "
                             f"{blocks.shape[0]} experts")
        blocks, scales = blocks[expert], scales[expert]
    if blocks.dim() != 3 or blocks.shape[-1] != 16 or scales.shape != blocks.shape[:-1]:
        raise ValueError(
            f"{p}_blocks {tuple(blocks.shape)} / {p}_scales {tuple(scales.shape)}: expected "
            "[out, in/32, 16] and [out, in/32] (optionally with a leading expert dim)"
        )
    out_f, n_blk = int(blocks.shape[0]), int(blocks.shape[1])
    qweight = blocks.reshape(out_f, n_blk * 16).contiguous()  # [out, in/2]
    return QuantizedWeight(
        "mxfp4", (out_f, n_blk * 32), {"qweight": qweight, "scale": scales.contiguous()}, 32
    )


def read_linear(
    tensors: Mapping[str, Tensor],
    prefix: str,
    quantization_config: dict[str, Any] | None,
    expert: int | None = None,
) -> QuantizedWeight:
    """The linear `prefix` (e.g. `model.layers.0.mlp.down_proj`) as stored, without requantizing.

    `tensors` maps full checkpoint names to tensors (a safetensors dict or a lazy mapping).
    Unquantized linears (ignored modules, or no quantization_config) come back as `bf16`.
    `expert` selects one expert of a stacked gpt-oss tensor.
    """
    sch = linear_scheme(prefix, quantization_config)
    if sch.style == "gpt-oss" and f"{prefix}_blocks" in tensors:
        return _read_gpt_oss(tensors, prefix, expert)
    if sch.style is None or (sch.style == "gpt-oss" and f"{prefix}.weight" in tensors):
        w = _get(tensors, f"{prefix}.weight", _FLOAT_SCALE, None)
        if w.dim() != 2:
            raise ValueError(
                f"checkpoint tensor {prefix + '.weight'!r} must be 2-D, got {tuple(w.shape)}"
            )
        return QuantizedWeight(
            "bf16", (int(w.shape[0]), int(w.shape[1])), {"weight": w.to(torch.bfloat16)}
        )
    if sch.style == "compressed-tensors" and sch.fmt == "int4":
        return _read_ct_int4(tensors, prefix, sch)
    if sch.style == "deepseek-fp8":
        w = _get(tensors, f"{prefix}.weight", torch.float8_e4m3fn, None)
        if w.dim() != 2:
            raise ValueError(
                f"checkpoint tensor {prefix + '.weight'!r} must be 2-D [out, in], got {tuple(w.shape)}"
            )
        out_f, in_f = int(w.shape[0]), int(w.shape[1])
        sshape = ((out_f + 127) // 128, (in_f + 127) // 128)
        s = _get(tensors, f"{prefix}.weight_scale_inv", torch.float32, sshape)
        return QuantizedWeight("fp8", (out_f, in_f), {"weight": w, "scale_inv": s}, 128)
    if sch.style == "gpt-oss":
        raise ValueError(f"checkpoint tensor {prefix + '_blocks'!r} is missing")
    return _read_fp4(tensors, prefix, sch)


def _inverse_exact(g: Tensor, name: str) -> Tensor:
    """A float32 c with float32(1 / c) == g, so compressed-tensors' inverted global scale
    reads back bitwise. Checks the neighbours of 1/g; any g read from such a checkpoint, or
    made by `quantize`, has one."""
    c0 = (1.0 / g.to(torch.float32)).reshape(())
    bits = c0.view(torch.int32)
    for k in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        c = (bits + k).view(torch.float32)
        if torch.equal(1.0 / c, g.reshape(())):
            return c
    raise ValueError(
        f"{name}: nvfp4 global_scale {g.item()!r} has no exact float32 reciprocal; "
        "compressed-tensors stores the inverse, so write it with style='modelopt' or requantize"
    )


def write_linear(qw: QuantizedWeight, prefix: str, style: str) -> dict[str, Tensor]:
    """Checkpoint tensors (full names) of `qw` in `style`; `read_linear` inverts it bitwise.

    bf16 weights are written as a plain `<prefix>.weight` in every style (they belong to the
    config's ignore list). gpt-oss writes one expert ([out, in/32, 16]); stack experts on dim 0.
    Every returned tensor owns its memory: an MoE expert's buffers may be slices of its layer's
    stacked experts (orbit.models.moe), which safetensors refuses as shared tensors.
    """
    return {k: _owned(v) for k, v in _write_linear(qw, prefix, style).items()}


def _owned(t: Tensor) -> Tensor:
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _write_linear(qw: QuantizedWeight, prefix: str, style: str) -> dict[str, Tensor]:
    t, (out_f, in_f) = qw.tensors, qw.shape
    if qw.fmt == "bf16":
        return {f"{prefix}.weight": t["weight"]}
    if style == "compressed-tensors" and qw.fmt == "int4":
        d = {
            f"{prefix}.weight_packed": t["qweight"],
            f"{prefix}.weight_scale": t["scale"],
            f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
        }
        if "offset" in t:
            zu = offset_to_zero_point(t["offset"], t["scale"], prefix)  # [out, in/g]
            pad = (-out_f) % 8
            zu_t = torch.nn.functional.pad(
                zu.T, (0, pad)
            )  # [in/g, out+pad], zero pad as compressed-tensors
            d[f"{prefix}.weight_zero_point"] = pack_int4(zu_t).T.contiguous()  # [ceil(out/8), in/g]
        return d
    if style == "compressed-tensors" and qw.fmt == "nvfp4":
        inv = _inverse_exact(t["global_scale"], prefix).reshape(1)
        return {
            f"{prefix}.weight_packed": t["qweight"],
            f"{prefix}.weight_scale": t["scale"],
            f"{prefix}.weight_global_scale": inv,
        }
    if style == "compressed-tensors" and qw.fmt == "mxfp4":
        return {f"{prefix}.weight_packed": t["qweight"], f"{prefix}.weight_scale": t["scale"]}
    if style == "deepseek-fp8" and qw.fmt == "fp8":
        return {f"{prefix}.weight": t["weight"], f"{prefix}.weight_scale_inv": t["scale_inv"]}
    if style == "modelopt" and qw.fmt == "nvfp4":
        return {
            f"{prefix}.weight": t["qweight"],
            f"{prefix}.weight_scale": t["scale"],
            f"{prefix}.weight_scale_2": t["global_scale"].reshape(()),
        }
    if style == "gpt-oss" and qw.fmt == "mxfp4":
        blocks = t["qweight"].reshape(out_f, in_f // 32, 16)  # [out, in/32, 16]
        return {f"{prefix}_blocks": blocks.contiguous(), f"{prefix}_scales": t["scale"]}
    raise ValueError(f"{prefix}: format {qw.fmt!r} cannot be written in checkpoint style {style!r}")
