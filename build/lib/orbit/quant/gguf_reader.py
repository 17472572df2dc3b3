"""gguf-py's `GGUFReader` with errors that name the file and the tensor.

gguf-py slices every tensor out of a memory map while it opens the file, then reshapes the
slice; on a truncated file the slice comes back short and numpy says only "cannot reshape array
of size 280 into shape (4,80)". This reader checks each tensor's extent first, so the error
names the file, the tensor, the bytes its type and shape need and the bytes the file holds.
It also knows which GGUF types gguf-py can dequantize, for the "unsupported type" message.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import GGUFReader as _GGUFReader
from gguf.quants import dequantize as gguf_dequantize

__all__ = ["GGUFFileError", "GGUFReader", "dequantizable_types", "supported_types_text"]

# Kept exactly by orbit.quant.gguf (everything else gguf-py dequantizes is requantized).
EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")


class GGUFFileError(ValueError):
    """A GGUF file Orbit cannot read; the message names the file (and tensor, when one is bad)."""


def _dequantizes(kind: GGMLQuantizationType, type_size: int) -> bool:
    try:
        gguf_dequantize(np.zeros((1, type_size), dtype=np.uint8), kind)
    except Exception:  # noqa: BLE001 - NotImplementedError, or a type gguf-py only names
        return False
    return True


@cache
def dequantizable_types() -> tuple[str, ...]:
    """Names of the GGUF block types this gguf-py can dequantize (probed on one zero block,
    because gguf-py lists them only in a private table that changes between versions)."""
    return tuple(
        sorted(
            kind.name
            for kind, (_, type_size) in GGML_QUANT_SIZES.items()
            if kind.name not in FLOAT_TYPES and _dequantizes(kind, type_size)
        )
    )


def supported_types_text() -> str:
    """One sentence listing the GGUF types Orbit reads, for error messages."""
    other = [n for n in dequantizable_types() if n not in EXACT_TYPES]
    return (
        f"Orbit keeps {', '.join(EXACT_TYPES)} exact, reads {', '.join(FLOAT_TYPES)}, and "
        f"dequantizes then requantizes {', '.join(other)}"
    )


class GGUFReader(_GGUFReader):
    """`gguf.GGUFReader` that raises `GGUFFileError` naming the file (and the tensor) instead
    of a bare numpy or struct error when the file is truncated or a tensor is malformed."""

    def __init__(self, path: os.PathLike[str] | str, mode: Any = "r") -> None:
        self.path = str(Path(path))
        try:
            super().__init__(path, mode)
        except GGUFFileError:
            raise
        except Exception as e:  # gguf-py reports a header cut short as any error
            raise GGUFFileError(
                f"{self.path}: cannot read the GGUF file ({type(e).__name__}: {e}); "
                "it may be truncated or not a GGUF file"
            ) from e

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        # `field.parts` is gguf-py's tensor-info layout, the same one its _build_tensors unpacks;
        # should a later gguf-py change it, skip the check rather than refuse every file.
        size = len(self.data)
        for field in fields:
            if len(field.parts) != 6:
                continue
            _, name_data, _, dims, raw_dtype, offset = field.parts
            name = str(bytes(name_data), encoding="utf-8", errors="replace")
            try:
                kind = GGMLQuantizationType(int(raw_dtype[0]))
            except ValueError:
                raise GGUFFileError(
                    f"{self.path}: GGUF tensor {name!r} has ggml type id {int(raw_dtype[0])}, "
                    f"which this gguf-py does not know; {supported_types_text()}"
                ) from None
            if kind not in GGML_QUANT_SIZES:
                continue  # gguf-py's own reader reports it
            block, type_size = GGML_QUANT_SIZES[kind]
            ne = [int(d) for d in dims]  # ggml order: ne[0] is the row (input) length
            if ne and ne[0] % block:
                raise GGUFFileError(
                    f"{self.path}: GGUF tensor {name!r} ({kind.name}, ggml shape {ne}) has rows "
                    f"of {ne[0]} elements, not a multiple of the {kind.name} block of {block}"
                )
            need = int(np.prod(ne, dtype=np.int64)) * type_size // block
            start = int(start_offs + offset[0])
            got = max(0, min(size, start + need) - start)
            if got < need:
                raise GGUFFileError(
                    f"{self.path}: GGUF tensor {name!r} ({kind.name}, ggml shape {ne}) needs "
                    f"{need} bytes of data at offset {start}, but the file ({size} bytes) holds "
                    f"only {got}: the file is truncated"
                )
        super()._build_tensors(start_offs, fields)
