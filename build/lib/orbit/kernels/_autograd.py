"""Backward of a fused forward through its torch reference formula.

The batch-invariant norm and the fused norm + RoPE only need their *forward* to be a custom
kernel (log-probs are compared, gradients are not); their backward differentiates the plain
torch formula, recomputed from the saved inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def reference_grads(reference: Callable[..., Tensor], inputs: Sequence[Any],
                    needs_grad: Sequence[bool], dy: Tensor) -> tuple[Tensor | None, ...]:
    """d(reference(*inputs))/d(input) contracted with dy, for each tensor input whose
    `needs_grad` flag is set; None for the other inputs (tensors or not)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) if isinstance(t, Tensor) else t
                  for t, need in zip(inputs, needs_grad, strict=True)]
        wanted = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad(reference(*leaves), wanted, dy) if wanted else ())
    return tuple(next(grads) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves)
