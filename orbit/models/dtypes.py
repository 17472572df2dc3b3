"""What `--compute-dtype auto` means: one rule for the trainer, the preflight and the demo.

bf16 on CUDA. On a CPU, bf16 where the cores have native bf16 dot products (AVX-512 BF16 or
AMX: oneDNN runs the matmuls 2.3-3x faster than float32 there; docs/benchmarks.md,
"Quickstart learning (CPU)", session 32), float32 elsewhere (without them a bf16 matmul is
emulated and slower). The attention of the SDPA paths runs in float32 on a CPU whatever this
gives (orbit/models/attention.py, `sdpa_dtype`).
"""

from __future__ import annotations

import torch

from orbit.orchestration.placement import resolve_device

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


# The quickstart's full recipe (48 steps) where a step is quick, a quarter of it where a CPU
# trains in float32 without AVX-512: on a 2-core AVX2-only EPYC a step took 78-100 s (the
# whole run ~70 min), and 12 steps still moved held-out pass@1 0.172 -> 0.375 in 18 minutes
# (docs/benchmarks.md, "Quickstart learning (CPU)", session 33).
FULL_QUICKSTART_STEPS = 48
SLOW_CPU_QUICKSTART_STEPS = 12


def slow_cpu_reason(device: str = "auto", compute_dtype: str = "auto") -> str | None:
    """Why a run on `device` would train slowly on this host's CPU, or None when it would not.

    Slow = the run lands on a CPU (`device` "cpu", or "auto" with no GPU visible), computes in
    float32 there, and torch's CPU kernels have no AVX-512
    (`torch.backends.cpu.get_cpu_capability()`)."""
    if (resolve_device(device, torch.cuda.device_count()) != "cpu"
            or resolve_compute_dtype(compute_dtype, "cpu") != torch.float32):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return None
    return f"a CPU run in float32 with {capability} kernels (no AVX-512)"


def _main(argv: list[str] | None = None) -> int:
    """`python -m orbit.models.dtypes quickstart-steps [--device D] [--compute-dtype C]`:
    print the quickstart's default step count for this host; the reason goes to stderr."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m orbit.models.dtypes")
    p.add_argument("what", choices=["quickstart-steps"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compute-dtype", default="auto", choices=["auto", *COMPUTE_DTYPES])
    args = p.parse_args(argv)
    reason = slow_cpu_reason(args.device, args.compute_dtype)
    if reason is None:
        print(FULL_QUICKSTART_STEPS)
        return 0
    print(f"NUM_ROLLOUT defaults to {SLOW_CPU_QUICKSTART_STEPS} (not {FULL_QUICKSTART_STEPS}) "
          f"here: {reason} trains a step in ~80-100 s; NUM_ROLLOUT={FULL_QUICKSTART_STEPS} runs "
          "the full recipe (~70 min)", file=sys.stderr)
    print(SLOW_CPU_QUICKSTART_STEPS)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
