"""GGUF tensors (read with gguf-py) as `QuantizedWeight`s, keeping Q4_0 / Q4_1 / Q8_0 exact.

llama.cpp's small blocks map onto Orbit's group-32 formats without losing a bit, so a GGUF
model trains on exactly the weights llama.cpp would serve:
- Q4_0 (fp16 d, 32 nibbles; d * (q - 8))   -> int4 symmetric, group 32, scale = d (fp16);
- Q4_1 (fp16 d, fp16 m; d * q + m)         -> int4 asymmetric, group 32, scale = d, offset = m;
- Q8_0 (fp16 d, 32 int8; d * q)            -> int8, group 32, scale = d;
- F32 / F16 / BF16                          -> bf16 (`gguf_float` keeps float32 for norms);
- anything else (Q4_K, Q6_K, ...)           -> gguf.quants.dequantize, then `quantize` to a
  chosen format (int8 by default) with the largest group of 128/64/32 that divides the input
  dim, and a warning naming the tensor and its type;
- a type gguf-py cannot dequantize (Q8_1, Q8_K, ...) -> ValueError naming tensor and type.
gguf-py gives `tensor.shape` in ggml order (ne0 = in first) and `tensor.data` as
[rows, bytes per row] for block types; the torch shape is the reversed `shape`.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize as gguf_dequantize
from torch import Tensor

from orbit.quant.gguf_reader import GGUFReader, supported_types_text
from orbit.quant.quantize import FIXED_GROUP_SIZE, quantize, resolve_group_size
from orbit.quant.qweight import QuantizedWeight

__all__ = [
    "GGUFReader",
    "gguf_float",
    "gguf_qweight",
    "llama_rope_unpermutation",
    "permute_rows",
    "requant_group_size",
]

QK = 32  # elements per Q4_0 / Q4_1 / Q8_0 block
_BLOCK_BYTES = {
    GGMLQuantizationType.Q4_0: 18,
    GGMLQuantizationType.Q4_1: 20,
    GGMLQuantizationType.Q8_0: 34,
}
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# Requantization groups, largest first: fewer scales, but SmolLM2's 576-wide rows only take 64.
FALLBACK_GROUPS = (128, 64, 32)


def torch_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The PyTorch shape of a GGUF tensor (gguf-py reports ggml's reversed order)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _shape2d(tensor: ReaderTensor) -> tuple[int, int]:
    shape = torch_shape(tensor)
    if len(shape) != 2:
        raise ValueError(f"GGUF tensor {tensor.name!r}: expected a 2-D weight, got shape {shape}")
    return shape


def _check_nbytes(tensor: ReaderTensor) -> None:
    """The tensor's data must hold exactly the bytes its type and shape imply (a short buffer
    would otherwise surface as a bare numpy reshape error)."""
    kind = tensor.tensor_type
    block, type_size = GGML_QUANT_SIZES[kind]
    need = int(tensor.n_elements) * type_size // block
    got = int(np.asarray(tensor.data).nbytes)
    if got != need:
        raise ValueError(
            f"GGUF tensor {tensor.name!r} ({kind.name}, shape {list(torch_shape(tensor))}) "
            f"needs {need} bytes of data, got {got} (truncated or corrupt file)"
        )


def _blocks(tensor: ReaderTensor) -> tuple[Tensor, int, int]:
    """Raw blocks uint8 [out, in/32, bytes per block]."""
    out_f, in_f = _shape2d(tensor)
    if in_f % QK:
        raise ValueError(
            f"GGUF tensor {tensor.name!r}: in_features {in_f} is not a multiple of {QK}"
        )
    _check_nbytes(tensor)
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))  # [out, bytes]
    return raw.reshape(out_f, in_f // QK, _BLOCK_BYTES[tensor.tensor_type]), out_f, in_f


def _q4_words(qs: Tensor) -> Tensor:
    """GGUF nibble bytes [out, nb, 16] -> Orbit int4 words int32 [out, nb*4].

    GGUF byte i holds element i (low nibble) and i+16 (high); Orbit wants element 2j in the
    low and 2j+1 in the high nibble of byte j. Both are byte-local shuffles, so this works on
    bytes without widening to one value per element.
    """
    even, odd = qs[..., 0::2], qs[..., 1::2]  # [out, nb, 8]
    lo = (even & 0x0F) | (odd << 4)  # elements 0..15; uint8 shifts drop the high nibble
    hi = (even >> 4) | (odd & 0xF0)  # elements 16..31
    out_bytes = torch.cat([lo, hi], dim=-1).reshape(qs.shape[0], -1)  # [out, in/2]
    return out_bytes.contiguous().view(torch.int32)  # little-endian: byte 0 = bits 0..7


def requant_group_size(
    name: str, shape: tuple[int, int], fmt: str, group_size: int | None = None
) -> int:
    """The group a requantized GGUF tensor of torch `shape` [out, in] gets in `fmt`.

    int4/int8: `group_size` if given, else the largest of FALLBACK_GROUPS that divides the
    input dim. Fixed-block formats use their own block (fp8 pads to 128x128, so any shape
    fits). ValueError naming the tensor and its dims when nothing fits.
    """
    in_f = shape[1]
    if fmt in FIXED_GROUP_SIZE:
        g = resolve_group_size(fmt, group_size)
        if fmt not in ("bf16", "fp8") and in_f % g:
            raise ValueError(
                f"GGUF tensor {name!r} [out={shape[0]}, in={in_f}] cannot be requantized to "
                f"{fmt}: its block of {g} does not divide the input dim {in_f}"
            )
        return g
    choices = FALLBACK_GROUPS if group_size is None else (resolve_group_size(fmt, group_size),)
    for g in choices:
        if in_f % g == 0:
            return g
    raise ValueError(
        f"GGUF tensor {name!r} [out={shape[0]}, in={in_f}] cannot be requantized to {fmt}: "
        f"no group size in {list(choices)} divides the input dim {in_f}"
    )


def gguf_qweight(
    tensor: ReaderTensor,
    fallback_fmt: str = "int8",
    fallback_group_size: int | None = None,
    row_perm: Tensor | None = None,
) -> QuantizedWeight:
    """A 2-D GGUF weight as a `QuantizedWeight` [out, in], its output rows reordered by
    `row_perm` if given (row i = stored row row_perm[i]: llama.cpp's q/k RoPE layout).

    Q4_0 / Q4_1 / Q8_0 are repacked exactly (then rows permuted, exactly); F32/F16/BF16 become
    `bf16`; any other type is dequantized with gguf-py, its float rows permuted, and
    requantized to `fallback_fmt` (a warning says so) with `fallback_group_size`, or by
    default the largest group of 128/64/32 dividing the input dim (so an fp8 fallback, whose
    128-row scale blocks cannot be permuted, works too). ValueError naming the tensor for a
    type gguf-py cannot dequantize or a shape the format cannot hold.
    """
    kind = tensor.tensor_type
    if kind in _BLOCK_BYTES or kind in _FLOAT_TYPES:
        qw = _exact_qweight(tensor)
        return qw if row_perm is None else permute_rows(qw, row_perm)
    shape = _shape2d(tensor)
    g = requant_group_size(tensor.name, shape, fallback_fmt, fallback_group_size)
    w = gguf_float(tensor)  # raises first for a type gguf-py cannot dequantize: no warning then
    if row_perm is not None:
        w = w[torch.as_tensor(row_perm, dtype=torch.int64)]
    warnings.warn(
        f"GGUF tensor {tensor.name!r} has type {kind.name}, which Orbit cannot keep exactly; "
        f"dequantizing and requantizing it to {fallback_fmt} (group {g})",
        stacklevel=2,
    )
    try:
        return quantize(w, fallback_fmt, group_size=g)
    except ValueError as e:  # e.g. inf/NaN after dequantizing: say which tensor
        raise ValueError(
            f"GGUF tensor {tensor.name!r} ({kind.name}): requantizing to {fallback_fmt} "
            f"failed: {e}"
        ) from e


def _exact_qweight(tensor: ReaderTensor) -> QuantizedWeight:
    """A Q4_0 / Q4_1 / Q8_0 weight repacked exactly, or a float one as `bf16`."""
    kind = tensor.tensor_type
    if kind in _BLOCK_BYTES:
        if sys.byteorder != "little":
            raise ValueError("GGUF block repacking reinterprets bytes; it needs a little-endian host")
        blocks, out_f, in_f = _blocks(tensor)
        halves = blocks.view(torch.float16)  # every block size is even: [out, nb, bytes/2]
        d = halves[..., 0].contiguous()  # [out, nb]
        if kind == GGMLQuantizationType.Q8_0:
            q = blocks[..., 2:].contiguous().view(torch.int8).reshape(out_f, in_f)
            return QuantizedWeight("int8", (out_f, in_f), {"qweight": q, "scale": d}, QK)
        if kind == GGMLQuantizationType.Q4_0:
            qweight = _q4_words(blocks[..., 2:])
            return QuantizedWeight("int4", (out_f, in_f), {"qweight": qweight, "scale": d}, QK)
        m = halves[..., 1].contiguous()
        qweight = _q4_words(blocks[..., 4:])
        return QuantizedWeight(
            "int4", (out_f, in_f), {"qweight": qweight, "scale": d, "offset": m}, QK
        )
    w = gguf_float(tensor)
    if w.dim() != 2:
        raise ValueError(
            f"GGUF tensor {tensor.name!r}: expected a 2-D weight, got shape {tuple(w.shape)}"
        )
    return QuantizedWeight(
        "bf16", (int(w.shape[0]), int(w.shape[1])), {"weight": w.to(torch.bfloat16)}
    )


def gguf_float(tensor: ReaderTensor) -> Tensor:
    """Any GGUF tensor as float32 in its torch shape (norms, biases, or a dequantized weight).

    F32 stays exact; F16/BF16 widen exactly; block types go through gguf.quants.dequantize.
    """
    shape = torch_shape(tensor)
    kind = tensor.tensor_type
    _check_nbytes(tensor)
    if kind == GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32, copy=True)).reshape(shape)
    if kind == GGMLQuantizationType.F16:
        return (
            torch.from_numpy(np.array(tensor.data, dtype=np.float16, copy=True))
            .reshape(shape)
            .float()
        )
    if kind == GGMLQuantizationType.BF16:
        raw = np.array(tensor.data, dtype=np.uint8, copy=True).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(shape).float()
    try:
        values = gguf_dequantize(np.asarray(tensor.data), kind)  # float32 in the torch shape
    except NotImplementedError as e:  # gguf-py has no dequantizer for e.g. Q8_1 / Q8_K / I32
        raise ValueError(
            f"GGUF tensor {tensor.name!r} has type {kind.name}, which gguf-py cannot "
            f"dequantize, so Orbit cannot read it. {supported_types_text()}."
        ) from e
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def llama_rope_unpermutation(out_features: int, n_head: int) -> Tensor:
    """Row indices `perm` with `hf_weight = gguf_weight[perm]` for Llama attn_q / attn_k.

    llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) stores Q/K rows as
    `w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2)`, interleaving the two rotary halves
    of each head; this is transformers' `_reverse_permute_weights`. Pass `n_head =
    num_attention_heads` for Q and `num_key_value_heads` for K.
    """
    if n_head <= 0 or out_features % (2 * n_head):
        raise ValueError(
            f"out_features {out_features} is not divisible by 2 * n_head = {2 * n_head}"
        )
    half = out_features // n_head // 2
    idx = torch.arange(out_features).reshape(
        n_head, half, 2
    )  # [head, j, k]: gguf row h*hd + 2j + k
    return idx.transpose(1, 2).reshape(-1)  # hf row h*hd + k*half + j


def permute_rows(qw: QuantizedWeight, perm: Tensor) -> QuantizedWeight:
    """`qw` with output rows reordered (row i of the result = row perm[i]), exactly.

    Groups and blocks run along the input dim, so whole rows move with their scales. fp8's
    128-row scale blocks cannot be split, so fp8 is refused.
    """
    out_f = qw.shape[0]
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.shape != (out_f,) or not torch.equal(torch.sort(perm).values, torch.arange(out_f)):
        raise ValueError(
            f"perm must be a permutation of range({out_f}), got shape {tuple(perm.shape)}"
        )
    if qw.fmt == "fp8":
        raise ValueError(
            "permute_rows: fp8 scales cover 128-row blocks; dequantize or requantize instead"
        )
    perm = perm.to(qw.device)
    tensors = {
        k: (v if v.dim() == 0 else v.index_select(0, perm).contiguous())
        for k, v in qw.tensors.items()
    }
    return QuantizedWeight(qw.fmt, qw.shape, tensors, qw.group_size)
