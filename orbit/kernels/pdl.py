"""Programmatic dependent launch (PDL) for decode kernels (Hopper and later).

A kernel launched with PDL may be scheduled while the kernel before it in the stream is still
running; `griddepcontrol.wait` then blocks until that kernel has finished and its writes are
visible. What it saves is the gap between two dependent kernels (launch latency, CTA ramp-up
behind the previous kernel's tail), which in a graphed batch-1 decode step of ~400 short
kernels is a visible share of the step.

`pdl_enter(PDL)` is the first statement of a PDL-capable kernel: with PDL it waits for the
previous kernel (before any load or store, so no read-after-write or write-after-read hazard
with it is possible) and lets the next kernel launch at once (its CTAs then wait in their own
`pdl_enter`). Without PDL it is nothing. `launch_kwargs(pdl)` is what the host adds to the
launch. Triton's interpreter (CPU tests) has neither, so callers pass `pdl` only on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch

from orbit.kernels._triton import HAS_TRITON, tl, triton

try:  # Triton >= 3.3 on CUDA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = HAS_TRITON
except ImportError:  # pragma: no cover - older Triton or a CPU-only install
    HAS_PDL = False

    def gdc_wait() -> None:  # placeholders keep the jit source importable
        raise RuntimeError("PDL needs Triton >= 3.3")

    gdc_launch_dependents = gdc_wait


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_available(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched with PDL (CUDA, sm_90+, Triton with GDC)."""
    if not HAS_PDL or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_kwargs(pdl: bool) -> dict[str, Any]:
    """Extra keyword arguments of a Triton launch: `launch_pdl=True` only when asked (the
    interpreter does not take the option)."""
    return {"launch_pdl": True} if pdl else {}
