"""Triton when it is installed, a placeholder when it is not.

CPU-only installs of torch come without Triton. The op modules (int4.py, fp8.py, ...) still
have to import there, because their plain-PyTorch references are the CPU compute path; only
their kernels are unusable. The placeholder lets the `@triton.jit` definitions and their
`tl.constexpr` annotations evaluate, and raises as soon as a kernel is actually launched.
"""

from __future__ import annotations

from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ModuleNotFoundError:  # CPU-only install: references work, kernels raise when launched
    HAS_TRITON = False

    class _Missing:
        """Stands in for `triton` / `triton.language`; any launch raises."""

        def __getattr__(self, name: str) -> Any:
            return _Missing()

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return _Unlaunchable(args[0])  # used as @triton.jit
            return _Missing()

    class _Unlaunchable:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(f"Triton is not installed; cannot launch kernel {self.fn.__name__}")

    triton = _Missing()  # type: ignore[assignment]
    tl = _Missing()  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "tl", "triton"]
