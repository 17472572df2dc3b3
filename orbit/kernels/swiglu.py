"""SwiGLU's elementwise part, `silu(gate) * up`, in one launch (forward only).

torch runs `F.silu(g) * u` as two kernels; in a batch-1 decode step of a 28-layer model that
is 56 launches of ~1 us for a few KB each. This kernel does both with torch's arithmetic, so
its output is bit for bit the torch expression's (the no-grad engine forward and the trainer's
autograd forward must agree exactly in exact mode): silu in float32 as `x / (1 + exp(-x))`
with an accurate exp (libdevice, not the fast ex2 approximation) and a correctly rounded
division, rounded to the input dtype, then the product of the two rounded values in float32,
rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.matmul_exact import interpreting
from orbit.kernels.pdl import pdl_enter, pdl_launch

BLOCK = 1024


@triton.jit
def silu_mul_values(g, u, dt: tl.constexpr, LIBDEVICE: tl.constexpr):
    """silu(g) * u in dt with torch's roundings (module doc), for any block shape: this
    kernel's arithmetic, and the gate/up GEMV's when it stores SwiGLU's output itself
    (orbit/kernels/gemv.py, PAIR; the Gluon mma kernel's swiglu store, int4_mma.py)."""
    gf = g.to(tl.float32)
    if LIBDEVICE:  # CUDA's accurate expf, as torch's kernel calls it
        e = tl.extra.cuda.libdevice.exp(-gf)
    else:  # the interpreter has no libdevice (tests: within an ulp of torch there)
        e = tl.exp(-gf)
    s = tl.div_rn(gf, 1.0 + e).to(dt)
    return (s.to(tl.float32) * u.to(tl.float32)).to(dt)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, C, stride_g, stride_u, BLOCK: tl.constexpr,
                     LIBDEVICE: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row, col = offs // C, offs % C
    g = tl.load(g_ptr + row * stride_g + col, mask=mask, other=0.0)
    u = tl.load(u_ptr + row * stride_u + col, mask=mask, other=0.0)
    # (s rounds to g's dtype, the product to y's: the same here, bf16/fp16 in and out)
    y = silu_mul_values(g, u, g.dtype, LIBDEVICE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul_reference(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


def silu_mul_available(g: Tensor, u: Tensor) -> bool:
    """The kernel serves 2-D-viewable CUDA fp16/bf16 pairs of one shape and dtype."""
    return (HAS_TRITON and g.is_cuda and g.dtype in (torch.bfloat16, torch.float16)
            and u.dtype == g.dtype and u.shape == g.shape)


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """`F.silu(g) * u` [..., C] -> [..., C], one launch where `silu_mul_available` (the kernel
    also runs under the Triton interpreter, for tests), the torch expression elsewhere."""
    if not (silu_mul_available(g, u) or (interpreting() and g.shape == u.shape)):
        return silu_mul_reference(g, u)
    C = g.shape[-1]
    g2, u2 = g.reshape(-1, C), u.reshape(-1, C)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    y = torch.empty(g2.shape, dtype=g.dtype, device=g.device)
    n = y.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        _silu_mul_kernel[grid](g2, u2, y, n, C, g2.stride(0), u2.stride(0), BLOCK=BLOCK,
                               LIBDEVICE=not interpreting(), num_warps=4,
                               **pdl_launch(g.device, grid[0]))
    return y.reshape(g.shape)
