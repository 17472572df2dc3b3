"""Store the new tokens' keys and values in the KV cache: one launch for both.

`cache[slot[t], pos[t]] = k[t]` as torch advanced indexing is one index_put kernel each for K
and V, ~3.3 us apiece on an H100 for a single decode token (2 per layer, 56 per Qwen3-1.7B
decode step: 0.19 ms of a 2.7 ms batch-1 step, docs/benchmarks.md). This kernel writes both
tensors of every token in one launch: program t copies token t's [Hkv, D] rows of k and v.
A copy (with the cache's dtype cast), so exact mode is unaffected.
"""

from __future__ import annotations

from torch import Tensor

from orbit.kernels._triton import HAS_TRITON, tl, triton
from orbit.kernels.pdl import pdl_enter, pdl_launch


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, pos_ptr,
                     stride_kt, stride_vt, stride_cs, stride_cp, HD: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HD
    slot = tl.load(slot_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    dst = slot * stride_cs + pos * stride_cp + offs
    k = tl.load(k_ptr + t * stride_kt + offs, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs, mask=mask)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_write_reference(kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, slot: Tensor,
                       pos: Tensor) -> None:
    """kc/vc [S, L, Hkv, D] (one layer); k/v [T, Hkv, D]; slot/pos [T]: torch indexing."""
    kc[slot, pos] = k.to(kc.dtype)
    vc[slot, pos] = v.to(vc.dtype)


def _inner_contiguous(t: Tensor) -> bool:
    """[.., Hkv, D] laid out as Hkv * D consecutive elements."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def kv_write_available(kc: Tensor, k: Tensor, v: Tensor) -> bool:
    return (HAS_TRITON and kc.is_cuda and k.is_cuda and _inner_contiguous(kc)
            and _inner_contiguous(k) and _inner_contiguous(v) and k.shape == v.shape)


def kv_write(kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, slot: Tensor, pos: Tensor) -> None:
    """As `kv_write_reference`, one Triton launch on CUDA (the reference elsewhere)."""
    if not kv_write_available(kc, k, v) or kc.stride() != vc.stride():
        kv_write_reference(kc, vc, k, v, slot, pos)
        return
    launch(kc, vc, k, v, slot, pos)


def launch(kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, slot: Tensor, pos: Tensor) -> None:
    """The kernel itself, for inner-contiguous tensors (tests run it in the interpreter)."""
    T, H, D = k.shape
    if T == 0:
        return
    _kv_write_kernel[(T,)](k, v, kc, vc, slot, pos, k.stride(0), v.stride(0), kc.stride(0),
                           kc.stride(1), HD=H * D, BLOCK=triton.next_power_of_2(H * D),
                           num_warps=4 if H * D >= 1024 else 2, **pdl_launch(k.device, T))
