"""Grouped dequantize-GEMM over quantized MoE experts (one launch for all experts).

`grouped_qmm(x, expert_offsets, stacked)` computes, for every expert e,
`y[o_e:o_{e+1}] = x[o_e:o_{e+1}] @ W_e^T` where the rows of x are already sorted by expert
(`SparseMoeBlock._grouped` sorts its (token, choice) pairs) and `stacked` holds the packed
tensors of one projection of all experts on a leading expert dim (`StackedQuantWeight`, built
from the experts' `QuantLinear` buffers by `stack_expert_weights`). `transpose=True` is the
input gradient, `dx = dy @ W_e` per expert.

Kernel: the loop of `_qgemm._qgemm_kernel` over a tile table. Each program handles one
(row tile, output tile); row tiles of BM rows never straddle two experts. The table (expert,
row start, row end) is built on the device from the offsets with torch ops (no host sync): the
grid is sized for the worst case `cdiv(R, BM) + E` row tiles and unused entries are empty
(their reduction loop runs zero times and they store nothing). A program offsets the packed
weight pointers by `e * expert_stride` and calls the shared per-format loader `_w_tile`, so
every format the dense kernel supports (int4 sym/asym, int8, fp8, nvfp4, mxfp4, bf16) works
here with the same dequantization, bit for bit equal to `orbit.quant.qweight.dequantize`.

`grouped_qmm_reference` is the plain-PyTorch loop (dequantize each expert, matmul); it is the
CPU path and what the kernel is tested against. Fixed tiles (BM=BO=BR=64), no autotuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor, nn

from orbit.kernels._qgemm import ACT_DTYPES, DEFAULT_UNPACK, FMT_IDS, _w_tile
from orbit.kernels._triton import tl, triton
from orbit.quant.qweight import FP8_BLOCK, MXFP4_GROUP, NVFP4_GROUP, QuantizedWeight

BM, BO, BR = 64, 64, 64
NUM_WARPS, NUM_STAGES = 4, 3
INT4_GROUPS = (32, 64, 128)
INT8_GROUPS = (32, 64, 128)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class StackedQuantWeight:
    """Packed tensors of E experts' weights of one logical shape (out, in), stacked on dim 0.

    Tensor names and per-expert layouts are those of `QuantizedWeight` (docs/architecture.md);
    nvfp4's `global_scale` is stacked to float32 [E].
    """

    fmt: str
    shape: tuple[int, int]
    tensors: dict[str, Tensor]
    group_size: int = 0

    @property
    def num_experts(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def expert(self, e: int) -> QuantizedWeight:
        """Expert e's weight as a `QuantizedWeight` over views of the stacked tensors."""
        return QuantizedWeight(self.fmt, self.shape, {n: t[e] for n, t in self.tensors.items()},
                               self.group_size)

    @classmethod
    def stack(cls, weights: list[QuantizedWeight]) -> StackedQuantWeight:
        """Stack same-format, same-shape weights (ValueError otherwise)."""
        if not weights:
            raise ValueError("cannot stack zero expert weights")
        w0 = weights[0]
        for i, w in enumerate(weights):
            if (w.fmt, w.shape, w.group_size, tuple(w.tensors)) != (
                    w0.fmt, w0.shape, w0.group_size, tuple(w0.tensors)):
                raise ValueError(f"expert {i} weight ({w.fmt}, {w.shape}, group {w.group_size}) "
                                 f"differs from expert 0 ({w0.fmt}, {w0.shape}, group {w0.group_size})")
            for n, t in w.tensors.items():
                if t.dtype != w0.tensors[n].dtype or t.shape != w0.tensors[n].shape:
                    raise ValueError(f"expert {i} tensor {n!r} is {t.dtype} {tuple(t.shape)}, "
                                     f"expert 0's {w0.tensors[n].dtype} {tuple(w0.tensors[n].shape)}")
        tensors = {}
        for n in w0.tensors:
            if n == "global_scale":
                tensors[n] = torch.stack([w.tensors[n].reshape(()) for w in weights])
            else:
                tensors[n] = torch.stack([w.tensors[n] for w in weights]).contiguous()
        return cls(w0.fmt, w0.shape, tensors, w0.group_size)


def stack_expert_weights(experts: nn.ModuleList, proj: str) -> StackedQuantWeight | None:
    """Stack `experts[e].<proj>` for all e, or None unless every one is a plain `QuantLinear`
    (not wrapped by an adapter, no bias, no W8A8, not in exact mode) of one format, group size
    and shape. The stacked copy is a second copy of the expert weights (see docs/models.md)."""
    from orbit.quant.linear import QuantLinear

    layers = [getattr(ex, proj, None) for ex in experts]
    if not layers or any(type(m) is not QuantLinear for m in layers):
        return None
    if any(m.bias is not None or m.act_quant is not None or m.exact for m in layers):
        return None
    try:
        return StackedQuantWeight.stack([m.quantized_weight() for m in layers])
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Validation


def _expected(sw: StackedQuantWeight, act_dtype: torch.dtype) -> dict[str, tuple[tuple, tuple]]:
    """name -> (allowed dtypes, shape) of each stacked tensor; ValueError for bad groups."""
    e = sw.num_experts
    out_f, in_f = sw.shape
    g = sw.group_size
    if sw.fmt == "int4":
        if g not in INT4_GROUPS or in_f % g:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUPS} and divide in={in_f}, got {g}")
        exp = {"qweight": ((torch.int32,), (e, out_f, in_f // 8)),
               "scale": (_FLOATS, (e, out_f, in_f // g))}
        if "offset" in sw.tensors:
            exp["offset"] = (_FLOATS, (e, out_f, in_f // g))
        return exp
    if sw.fmt == "int8":
        if g not in INT8_GROUPS or in_f % g:
            raise ValueError(f"int8 group_size must be one of {INT8_GROUPS} and divide in={in_f}, got {g}")
        return {"qweight": ((torch.int8,), (e, out_f, in_f)),
                "scale": (_FLOATS, (e, out_f, in_f // g))}
    if sw.fmt == "fp8":
        nb = (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
        return {"weight": ((torch.float8_e4m3fn,), (e, out_f, in_f)),
                "scale_inv": ((torch.float32,), (e, *nb))}
    if sw.fmt in ("nvfp4", "mxfp4"):
        grp = NVFP4_GROUP if sw.fmt == "nvfp4" else MXFP4_GROUP
        if in_f % grp:
            raise ValueError(f"{sw.fmt} needs in_features % {grp} == 0, got in={in_f}")
        sdt = torch.float8_e4m3fn if sw.fmt == "nvfp4" else torch.uint8
        exp = {"qweight": ((torch.uint8,), (e, out_f, in_f // 2)),
               "scale": ((sdt,), (e, out_f, in_f // grp))}
        if sw.fmt == "nvfp4":
            exp["global_scale"] = ((torch.float32,), (e,))
        return exp
    if sw.fmt == "bf16":
        return {"weight": ((act_dtype,), (e, out_f, in_f))}
    raise ValueError(f"grouped_qmm does not support format {sw.fmt!r}")


def _check(x: Tensor, expert_offsets: Tensor, sw: StackedQuantWeight, transpose: bool) -> None:
    if not isinstance(sw, StackedQuantWeight):
        raise TypeError(f"stacked must be a StackedQuantWeight, got {type(sw).__name__}")
    out_f, in_f = sw.shape
    name = "dy" if transpose else "x"
    feats = out_f if transpose else in_f
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [R, {feats}], got shape {tuple(x.shape)}")
    if x.shape[1] != feats:
        raise ValueError(f"{name} has {x.shape[1]} features, the expert weights expect {feats}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"{name} must be bfloat16 or float16, got {x.dtype}")
    if x.shape[0] > 0 and x.stride(1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim, got strides {x.stride()}")
    exp = _expected(sw, x.dtype)
    if set(sw.tensors) != set(exp):
        raise ValueError(f"{sw.fmt} stacked weight must have tensors {sorted(exp)}, "
                         f"got {sorted(sw.tensors)}")
    for n, (dtypes, shape) in exp.items():
        t = sw.tensors[n]
        if t.dtype not in dtypes:
            raise ValueError(f"stacked tensor {n!r} must be one of {dtypes}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"stacked tensor {n!r} must have shape {shape}, got {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"stacked tensor {n!r} must be contiguous")
        if t.device != x.device:
            raise ValueError(f"stacked tensor {n!r} is on {t.device}, {name} on {x.device}")
    e = sw.num_experts
    if expert_offsets.dim() != 1 or expert_offsets.shape[0] != e + 1:
        raise ValueError(f"expert_offsets must be 1-D of length num_experts + 1 = {e + 1}, "
                         f"got shape {tuple(expert_offsets.shape)}")
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expert_offsets must be int32 or int64, got {expert_offsets.dtype}")
    if expert_offsets.device != x.device:
        raise ValueError(f"expert_offsets is on {expert_offsets.device}, {name} on {x.device}")
    if not expert_offsets.is_cuda:  # values need a host sync on the GPU; checked on CPU only
        o = expert_offsets.tolist()
        if o[0] != 0 or o[-1] != x.shape[0] or any(b < a for a, b in pairwise(o)):
            raise ValueError(f"expert_offsets must rise from 0 to R={x.shape[0]}, got {o}")


# ---------------------------------------------------------------------------------------------
# Reference and kernel


def grouped_qmm_reference(x: Tensor, expert_offsets: Tensor, stacked: StackedQuantWeight,
                          transpose: bool = False) -> Tensor:
    """Same contract as `grouped_qmm`, in plain PyTorch: per expert, dequantize to x.dtype and
    matmul. x [R, in] -> [R, out] (transpose: dy [R, out] -> [R, in])."""
    _check(x, expert_offsets, stacked, transpose)
    out_f, in_f = stacked.shape
    y = x.new_zeros((x.shape[0], in_f if transpose else out_f))
    offs = expert_offsets.tolist()
    for e in range(stacked.num_experts):
        a, b = offs[e], offs[e + 1]
        if b > a:
            w = stacked.expert(e).dequantize(x.dtype)  # [out, in]
            y[a:b] = x[a:b] @ (w if transpose else w.T)
    return y


def tile_table(offs: Tensor, rows: int, bm: int = BM) -> Tensor:
    """int32 [cdiv(rows, bm) + E, 3]: (expert, row start, row end) of every bm-row tile, no
    expert straddled; unused trailing entries are (0, 0, 0). Torch ops on the offsets' device,
    no host sync (the length is the worst case, so it needs only the row count)."""
    offs = offs.to(torch.int64)
    e_count = offs.shape[0] - 1
    n_max = triton.cdiv(rows, bm) + e_count
    counts = offs[1:] - offs[:-1]  # [E]
    tiles = (counts + bm - 1) // bm  # [E]
    ends = torch.cumsum(tiles, 0)  # [E] tile index one past each expert's last
    t = torch.arange(n_max, device=offs.device)
    e = torch.searchsorted(ends, t, right=True)  # [n_max]; E for unused entries
    valid = e < e_count
    ec = e.clamp(max=e_count - 1)
    first = ends[ec] - tiles[ec]
    start = offs[ec] + (t - first) * bm
    end = torch.minimum(start + bm, offs[ec + 1])
    zero = torch.zeros_like(t)
    table = torch.stack([torch.where(valid, ec, zero), torch.where(valid, start, zero),
                         torch.where(valid, end, zero)], 1)
    return table.to(torch.int32).contiguous()


@triton.jit
def _grouped_qgemm_kernel(x_ptr, y_ptr, q_ptr, s_ptr, o_ptr, g_ptr, tab_ptr, N, K,
                          stride_xm, stride_ym, stride_q, stride_s,
                          stride_qe, stride_se, stride_ge,
                          FMT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                          TRANS: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr,
                          BR: tl.constexpr, UNPACK: tl.constexpr):
    # W_e is [N, K]. TRANS=0: y[rows, N] = x[rows, K] @ W_e^T. TRANS=1: y[rows, K] = x @ W_e.
    if TRANS:
        OUT = K
        RED = N
    else:
        OUT = N
        RED = K
    pid_t = tl.program_id(0)  # row tile (consecutive programs share an expert's weight tile)
    pid_o = tl.program_id(1)
    e = tl.load(tab_ptr + pid_t * 3).to(tl.int64)
    row0 = tl.load(tab_ptr + pid_t * 3 + 1)
    row1 = tl.load(tab_ptr + pid_t * 3 + 2)
    red_end = tl.where(row1 > row0, RED, 0)  # empty table entries reduce nothing, store nothing
    q_e = q_ptr + e * stride_qe
    s_e = s_ptr + e * stride_se
    o_e = o_ptr + e * stride_se  # offset shares the scale's layout (checked by the wrapper)
    g_e = g_ptr + e * stride_ge
    o0 = pid_o * BO
    offs_m = row0 + tl.arange(0, BM)
    m_ok = offs_m < row1
    offs_r = tl.arange(0, BR)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_r[None, :]
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BO), dtype=tl.float32)
    for r0 in range(0, red_end, BR):
        xmask = m_ok[:, None] & (r0 + offs_r[None, :] < RED)
        xt = tl.load(x_ptrs, mask=xmask, other=0.0)  # [BM, BR]
        if TRANS:
            w = _w_tile(q_e, s_e, o_e, g_e, stride_q, stride_s, r0, o0, N, K,
                        FMT, GROUP, HAS_OFFSET, BR, BO, UNPACK)  # [BR, BO]
            acc = tl.dot(xt, w.to(dt), acc)
        else:
            w = _w_tile(q_e, s_e, o_e, g_e, stride_q, stride_s, o0, r0, N, K,
                        FMT, GROUP, HAS_OFFSET, BO, BR, UNPACK)  # [BO, BR]
            acc = tl.dot(xt, tl.trans(w.to(dt)), acc)
        x_ptrs += BR
    offs_o = o0 + tl.arange(0, BO)
    ymask = m_ok[:, None] & (offs_o[None, :] < OUT)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_o[None, :], acc.to(dt),
             mask=ymask)


_QS_NAMES = {"int4": ("qweight", "scale"), "int8": ("qweight", "scale"),
             "fp8": ("weight", "scale_inv"), "nvfp4": ("qweight", "scale"),
             "mxfp4": ("qweight", "scale"), "bf16": ("weight", "weight")}


def grouped_qmm(x: Tensor, expert_offsets: Tensor, stacked: StackedQuantWeight,
                transpose: bool = False, out: Tensor | None = None) -> Tensor:
    """x [R, in] (rows sorted by expert; expert e owns rows expert_offsets[e]:[e+1]) ->
    y [R, out] with y_e = x_e @ W_e^T; transpose: dy [R, out] -> dx [R, in] = dy_e @ W_e.
    Runs the Triton kernel on whatever device x is on (the CPU only under TRITON_INTERPRET=1);
    `out` (tests poison it) receives every row that some expert owns."""
    _check(x, expert_offsets, stacked, transpose)
    out_f, in_f = stacked.shape
    r = x.shape[0]
    out_dim = in_f if transpose else out_f
    if out is None:
        y = torch.empty((r, out_dim), device=x.device, dtype=x.dtype)
    else:
        if tuple(out.shape) != (r, out_dim) or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} {(r, out_dim)} on {x.device}, got "
                             f"{out.dtype} {tuple(out.shape)} on {out.device}")
        if r and out.stride(1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
        y = out
    if r == 0:
        return y
    fmt = stacked.fmt
    t = stacked.tensors
    qn, sn = _QS_NAMES[fmt]
    q, s = t[qn], t[sn]
    offset = t.get("offset")
    gs = t.get("global_scale")
    table = tile_table(expert_offsets, r, BM)
    grid = (table.shape[0], triton.cdiv(out_dim, BO))
    _grouped_qgemm_kernel[grid](
        x, y, q, s, offset if offset is not None else s, gs if gs is not None else s, table,
        out_f, in_f, x.stride(0), y.stride(0), q.stride(1), s.stride(1),
        q.stride(0), s.stride(0), gs.stride(0) if gs is not None else 0,
        FMT=FMT_IDS[fmt], GROUP=stacked.group_size, HAS_OFFSET=offset is not None,
        TRANS=transpose, BM=BM, BO=BO, BR=BR, UNPACK=DEFAULT_UNPACK.get(fmt, 0),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return y


class GroupedQMM(torch.autograd.Function):
    """y = grouped_qmm(x, offsets, W) with dx = grouped_qmm(dy, offsets, W, transpose=True);
    the frozen weights get no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, expert_offsets: Tensor,  # type: ignore[override]
                stacked: StackedQuantWeight) -> Tensor:
        ctx.stacked = stacked
        ctx.save_for_backward(expert_offsets)
        return grouped_qmm(x, expert_offsets, stacked)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (offs,) = ctx.saved_tensors
        return grouped_qmm(dy.contiguous(), offs, ctx.stacked, transpose=True), None, None


def grouped_qmm_autograd(x: Tensor, expert_offsets: Tensor, stacked: StackedQuantWeight) -> Tensor:
    """`grouped_qmm` with the input gradient when x requires grad."""
    if torch.is_grad_enabled() and x.requires_grad:
        return GroupedQMM.apply(x, expert_offsets, stacked)
    return grouped_qmm(x, expert_offsets, stacked)
