"""What `--compute-dtype auto` means: one rule for the trainer, the preflight and the demo.

bf16 on CUDA. On a CPU, bf16 where the cores have native bf16 dot products (AVX-512 BF16 or
AMX: oneDNN runs the matmuls 2.3-3x faster than float32 there; docs/benchmarks.md,
"Quickstart learning (CPU)", session 32), float32 elsewhere (without them a bf16 matmul is
emulated and slower). The attention of the SDPA paths runs in float32 on a CPU whatever this
gives (orbit/models/attention.py, `sdpa_dtype`).
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AMX tiles or AVX-512 BF16),
    as torch's own CPU capability probes report it."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)


def auto_compute_dtype(device: torch.device | str) -> torch.dtype:
    """The activation dtype `auto` picks on `device` (see the module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda" or (dev.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def resolve_compute_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`--compute-dtype` ("auto", "bf16", "float32") -> a torch dtype on `device`."""
    if name == "auto":
        return auto_compute_dtype(device)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be 'auto', 'bf16' or 'float32', got {name!r}")
    return COMPUTE_DTYPES[name]
