"""FP8 block-128 weights: W8A16 (dequantize in the kernel) and W8A8 (FP8 activations).

Layout: `weight` float8_e4m3fn [out, in], `scale_inv` float32 [ceil(out/128), ceil(in/128)]
(DeepSeek-V3 style; despite the name, dequant multiplies).

- W8A16: `fp8_tile` feeds the shared dequantize-GEMM loop in `_qgemm.py`; forward and the
  input gradient both use it.
- W8A8: `act_quant_fp8` quantizes activations per token per 128 input columns (1x128 groups)
  to e4m3 with an fp32 scale amax/448, then `_w8a8_kernel` runs an fp8 `tl.dot` per 128-wide
  K block and applies both block scales in fp32 before adding into the accumulator (the
  DeepSeek recipe: scales are promoted every 128 elements). Its backward is straight-through:
  dX is computed W8A16-style (`fp8_matmul(dy, qw, transpose=True)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton
from orbit.kernels.lora_epilogue import LoRAEpilogue
from orbit.kernels.norm_epilogue import NormEpilogue
from orbit.quant.qweight import FP8_BLOCK, QuantizedWeight

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-12  # an all-zero group gets a tiny scale instead of a division by zero


@triton.jit
def fp8_tile(q_ptr, s_ptr, stride_q, stride_s, n0, k0, N, K,
             ROWS: tl.constexpr, COLS: tl.constexpr):
    """W[n0:n0+ROWS, k0:k0+COLS] in float32; COLS <= 128 and k0 a multiple of COLS, so the
    tile's columns lie in one 128-block (rows may span several)."""
    offs_n = n0 + tl.arange(0, ROWS)
    offs_k = k0 + tl.arange(0, COLS)
    row_ok = offs_n < N
    w = tl.load(q_ptr + offs_n[:, None] * stride_q + offs_k[None, :],
                mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (offs_n // 128) * stride_s + k0 // 128, mask=row_ok, other=0.0)
    return w * s[:, None]


@triton.jit
def _act_quant_kernel(x_ptr, xq_ptr, sx_ptr, M, K, stride_xm, stride_qm, stride_sm,
                      BM: tl.constexpr):
    # One program: BM rows x one 128-column group.
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    offs_k = g * 128 + tl.arange(0, 128)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)  # [BM]
    scale = amax * (1.0 / 448.0)  # a multiply, as torch on CUDA turns `/ 448` into one
    xq = tl.div_rn(x, scale[:, None]).to(tl.float8e4nv)
    tl.store(xq_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], xq, mask=mask)
    tl.store(sx_ptr + offs_m * stride_sm + g, scale, mask=offs_m < M)


@triton.jit
def _w8a8_kernel(xq_ptr, sx_ptr, w_ptr, sw_ptr, y_ptr, M, N, K,
                 stride_xm, stride_sxm, stride_wn, stride_swn, stride_ym,
                 BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, 128)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kb in range(tl.cdiv(K, 128)):
        k_ok = kb * 128 + offs_k < K
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + kb * 128 + offs_k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, 128] e4m3
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + kb * 128 + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # [BN, 128] e4m3
        sa = tl.load(sx_ptr + offs_m * stride_sxm + kb, mask=m_ok, other=0.0)  # [BM]
        sb = tl.load(sw_ptr + (offs_n // 128) * stride_swn + kb, mask=n_ok, other=0.0)  # [BN]
        part = tl.dot(a, tl.trans(b))  # fp32 partial sum of one 128-block
        acc += part * sa[:, None] * sb[None, :]
    ymask = m_ok[:, None] & n_ok[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _check(x: Tensor, qw: QuantizedWeight, transpose: bool) -> None:
    from orbit.kernels._qgemm import check_activation, check_tensor  # _qgemm imports this module

    out_f, in_f = qw.shape
    if qw.fmt != "fp8":
        raise ValueError(f"fp8_matmul got a {qw.fmt!r} weight")
    t = qw.tensors
    check_tensor(t["weight"], "weight", torch.float8_e4m3fn, (out_f, in_f))
    nb = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
    check_tensor(t["scale_inv"], "scale_inv", torch.float32, nb)
    check_activation(x, "dy" if transpose else "x", out_f if transpose else in_f, t["weight"].device)


def fp8_matmul(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
               exact: bool = False, out: Tensor | None = None,
                lora: LoRAEpilogue | None = None, norm: NormEpilogue | None = None) -> Tensor:
    """W8A16: x [M, in] @ W^T -> [M, out]; with transpose, dy [M, out] @ W -> [M, in].
    `lora`: a `lora_epilogue.LoRAEpilogue` added in the decode GEMV's store; `norm`: see
    `_qgemm.launch`."""
    from orbit.kernels._qgemm import launch

    _check(x, qw, transpose)
    t = qw.tensors
    return launch(x, "fp8", qw.shape, t["weight"], t["scale_inv"], None, None, FP8_BLOCK,
                  transpose, exact, out, lora=lora, norm=norm)


def fp8_matmul_reference(x: Tensor, qw: QuantizedWeight, *, transpose: bool = False,
                         exact: bool = False) -> Tensor:
    """Same contract as `fp8_matmul`, in plain PyTorch."""
    w = qw.dequantize(x.dtype)  # [out, in]
    return x @ w if transpose else x @ w.T


def act_quant_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] bf16/fp16 -> (xq e4m3 [M, K], scale fp32 [M, ceil(K/128)]), x ~= xq * scale."""
    m, k = x.shape
    xq = torch.empty((m, k), device=x.device, dtype=torch.float8_e4m3fn)
    sx = torch.empty((m, triton.cdiv(k, 128)), device=x.device, dtype=torch.float32)
    if m:
        bm = 32
        _act_quant_kernel[(triton.cdiv(m, bm), sx.shape[1])](
            x, xq, sx, m, k, x.stride(0), xq.stride(0), sx.stride(0), BM=bm, num_warps=4)
    return xq, sx


def act_quant_fp8_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as `act_quant_fp8`, in plain PyTorch."""
    m, k = x.shape
    groups = -(-k // 128)
    xf = torch.nn.functional.pad(x.to(torch.float32), (0, groups * 128 - k))
    xg = xf.reshape(m, groups, 128)  # [M, G, 128]
    scale = xg.abs().amax(-1).clamp_min(AMAX_FLOOR) * (1.0 / E4M3_MAX)  # [M, G]
    xq = (xg / scale[..., None]).to(torch.float8_e4m3fn).reshape(m, groups * 128)[:, :k]
    return xq, scale


W8A8_TILES = (128, 128, 8, 3)  # bm, bn, warps, stages: one config for every M


def w8a8_gemm(xq: Tensor, sx: Tensor, qw: QuantizedWeight, out_dtype: torch.dtype,
              out: Tensor | None = None, tiles: tuple[int, int, int, int] = W8A8_TILES) -> Tensor:
    """xq e4m3 [M, in] with scales sx [M, ceil(in/128)] times the block-fp8 weight -> [M, out].

    One fixed tile config for every M: no split-K, and the activation scales are per row, so
    the result is batch-invariant without a separate exact mode."""
    t = qw.tensors
    m, (n, k) = xq.shape[0], qw.shape
    assert xq.dtype == torch.float8_e4m3fn and xq.shape[1] == k and xq.stride(1) == 1
    assert sx.dtype == torch.float32 and sx.shape == (m, triton.cdiv(k, 128))
    y = torch.empty((m, n), device=xq.device, dtype=out_dtype) if out is None else out
    assert y.shape == (m, n) and y.dtype == out_dtype and y.stride(1) == 1
    if m == 0:
        return y
    bm, bn, warps, stages = tiles
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _w8a8_kernel[grid](xq, sx, t["weight"], t["scale_inv"], y, m, n, k,
                       xq.stride(0), sx.stride(0), t["weight"].stride(0),
                       t["scale_inv"].stride(0), y.stride(0),
                       BM=bm, BN=bn, GROUP_M=8, num_warps=warps, num_stages=stages)
    return y


# From this many rows on (fast mode), cuBLAS's block-scaled FP8 GEMM through torch._scaled_mm
# runs instead of the Triton kernel: 1.3-1.6x BF16 against 0.8-0.9x (docs/kernels.md).
SCALED_MM_MIN_M = 1024


def w8a8_matmul(x: Tensor, qw: QuantizedWeight, *, exact: bool = False,
                out: Tensor | None = None) -> Tensor:
    """x [M, in] -> [M, out]: per-token-group fp8 activations times block-fp8 weights."""
    from orbit.kernels._qgemm import check_out

    _check(x, qw, transpose=False)
    xq, sx = act_quant_fp8(x)
    (n, k), m = qw.shape, x.shape[0]
    if not exact and m >= SCALED_MM_MIN_M and n % 128 == 0 and k % 128 == 0:
        # Same recipe (1x128 activation blocks, 128x128 weight blocks, fp32 accumulation);
        # cuBLAS wants the activation scales M-major and W as a column-major [in, out].
        t = qw.tensors
        y = torch._scaled_mm(xq, t["weight"].t(), scale_a=sx.t().contiguous().t(),
                             scale_b=t["scale_inv"].t(), out_dtype=x.dtype)
        return y if out is None else check_out(out, (m, n), x).copy_(y)
    return w8a8_gemm(xq, sx, qw, x.dtype, check_out(out, (m, n), x))


def w8a8_matmul_reference(x: Tensor, qw: QuantizedWeight, *, exact: bool = False) -> Tensor:
    """Same contract as `w8a8_matmul`: quantize x like the kernel, then an fp32 matmul."""
    xq, sx = act_quant_fp8_reference(x)
    k = x.shape[1]
    xd = xq.to(torch.float32) * sx.repeat_interleave(128, dim=1)[:, :k]  # [M, K]
    return (xd @ qw.dequantize(torch.float32).T).to(x.dtype)
