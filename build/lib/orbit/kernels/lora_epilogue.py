"""A LoRA adapter inside the base launch: `y = x W^T + scale * (x A^T) B^T` with the expand-add
done at the store of the program that owns each output tile, and h = x A^T computed by the
launch's own first programs (forward only, fast mode).

Why: a LoRA decode group (orbit/adapters/lora_decode.py) cost two launches on top of its base
launch, a shrink `h = x A^T` and an expand-add `y += scale * h B^T`, each a few KB of work and
~2-3 us of fixed latency (docs/benchmarks.md, session 9: 0.40 ms of a 1.63 ms batch-1 step).
The base launch already owns each output tile exactly once at its store (directly, or in the
program that arrives last in the GEMV's split-K fix-up), so it adds the tile's delta there
from h (r values per row) and the tile's rows of B (`lora_delta` + `lora_add` in the GEMVs,
`lora_store_dot` in the `tl.dot` loop). With A given (`LoRAEpilogue.a`) the launch computes h
too: its first programs are shrink programs (`lora_shrink_role`, `lora_shrink_role_dot`) that
store h and signal a counter; each tile's final writer waits for their signals
(`lora_await`) before its delta, and the last reader re-arms the counters (`lora_release`).
A group is then its base launch(es) alone. The shrink programs come first in every grid row
and wait on nothing, so a waiting program never holds back one it waits for (in-order block
dispatch, as stream-K fix-ups assume).

Arithmetic: the unfused path's roundings, in its order: the base output rounded to the
activation dtype, `h B^T` summed in fp32 and rounded, times the scale in fp32 and rounded,
added in fp32 and rounded; the products and sum over r are those of the expand kernel's
broadcast path (GEMVs) or its `tl.dot` (the dot loop) (orbit/kernels/lora_decode.py), and h
is the separate shrink's (one accumulation over K in the dot loop from 8 rows, where the shrink
kernel adds K chunks: a last-bit difference at most), so only summation order can differ.

The `tl.dot` loop (orbit/kernels/_qgemm.py: the fast-mode forward from 5 rows up to the
dequantize-then-cuBLAS sizes) takes a one-member epilogue: from 5 rows on the quantized
sibling groups stand aside, so each member runs its own launch there.

A GEMV over a sibling group's stacked weight (q/k/v: one [q+k+v, in] launch) has up to
MAX_MEMBERS members: columns [0, N0) belong to member 0, [N0, N0 + N1) to member 1, the rest to
member 2; h holds the members' r-column blocks side by side ([M, S*r], what
`lora_decode.lora_shrink` returns). A tile may straddle two members: each column picks its
member's B row and h block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from orbit.kernels._triton import tl, triton
from orbit.kernels.lora_decode import ELEMS as SHRINK_ELEMS
from orbit.kernels.lora_decode import _member, _shrink_block

MAX_MEMBERS = 3


@dataclass(frozen=True)
class LoRAEpilogue:
    """h [M, S*r] (activation dtype), B_s [N_s, r] per member (contiguous), the adapter scale
    (alpha / r), and optionally the members' A_s [r, K] (contiguous): then h is an output
    buffer that the launch fills with x A_s^T itself (the plane and FP8 GEMVs in their own
    grid, `lora_shrink_role`; other kernels with a shrink launch first); without A, h is the
    shrink's output, read."""

    h: Tensor
    b: tuple[Tensor, ...]
    scale: float
    a: tuple[Tensor, ...] | None = None

    def check(self, y: Tensor, x: Tensor | None = None, n: int | None = None) -> None:
        """Raise ValueError naming the first tensor that does not fit an output y [M, sum N_s]
        (and, with A, the input x [M, K]); `n`: the launch's weight rows where y is narrower
        (SwiGLU's output of a gate/up launch)."""
        b, h = self.b, self.h
        if self.a is not None:
            if len(self.a) != len(b):
                raise ValueError(f"LoRA epilogue: {len(self.a)} A for {len(b)} B")
            k = x.shape[1] if x is not None else self.a[0].shape[-1]
            r0 = b[0].shape[1] if b[0].dim() == 2 else -1
            for i, ai in enumerate(self.a):
                if ai.shape != (r0, k) or not ai.is_contiguous() or ai.dtype != y.dtype:
                    raise ValueError(f"LoRA epilogue: A[{i}] must be contiguous [{r0}, {k}] "
                                     f"{y.dtype}; got {tuple(ai.shape)} {ai.dtype}")
        if not 1 <= len(b) <= MAX_MEMBERS:
            raise ValueError(f"LoRA epilogue: 1..{MAX_MEMBERS} members, got {len(b)}")
        r = b[0].shape[1] if b[0].dim() == 2 else -1
        for i, bi in enumerate(b):
            if bi.dim() != 2 or bi.shape[1] != r or not bi.is_contiguous() or bi.dtype != y.dtype:
                raise ValueError(f"LoRA epilogue: B[{i}] must be contiguous [N, {r}] {y.dtype}; "
                                 f"got {tuple(bi.shape)} {bi.dtype}")
        rows = sum(bi.shape[0] for bi in b)
        if (n if n is not None else y.shape[1]) != rows:
            raise ValueError(f"LoRA epilogue: the members' B have {rows} rows in all, the "
                             f"output {n if n is not None else y.shape[1]} columns")
        if h.shape != (y.shape[0], len(b) * r) or h.stride(-1) != 1 or h.dtype != y.dtype:
            raise ValueError(f"LoRA epilogue: h must be [{y.shape[0]}, {len(b) * r}] {y.dtype} "
                             f"with unit column stride; got {tuple(h.shape)} {h.dtype}")
        if h.device != y.device or any(bi.device != y.device for bi in b):
            raise ValueError("LoRA epilogue: h, B and the output must be on one device")


def kernel_args(lora: LoRAEpilogue | None, x: Tensor, y: Tensor, counters: Tensor | None,
                shrink: bool, n: int | None = None,
                shrink_programs: int | None = None) -> tuple[tuple, dict]:
    """(runtime args, constexprs) of a GEMV launch for `lora`: h, A x3, B x3, N0, N1, r, scale,
    h's row stride, the h counters, S*r; LORA (members; 0 compiles the epilogue out), LRP,
    SHRINK (this launch computes h: `lora_shrink_role`, with `counters` two zeroed int32 that
    it leaves zeroed) and SBK (the shrink's K step). Dummies where None. The `tl.dot` loop
    takes the same arguments and reads h, b0, r, the scale and the stride only. `n`: the
    launch's weight rows where y is narrower (LoRAEpilogue.check). `shrink_programs`: the
    launch's shrink program count (LSR) where it is not one per row of A (S*r), as in the
    `tl.dot` loop's row-block shrink."""
    if lora is None:
        return ((y,) * 7 + (0, 0, 0, 0.0, 0, y, 0),
                {"LORA": 0, "LRP": 1, "SHRINK": False, "SBK": 16})
    lora.check(y, x, n)
    b = list(lora.b)
    ns = [bi.shape[0] for bi in b] + [0, 0]
    r = b[0].shape[1]
    a = list(lora.a) if shrink and lora.a is not None else [b[0]]
    mp = triton.next_power_of_2(x.shape[0])
    # the separate shrink's K step below 8 rows (lora_decode.lora_shrink): the same sums
    sbk = max(16, min(triton.next_power_of_2(x.shape[1]), SHRINK_ELEMS // mp))
    return ((lora.h, *_pad(a), *_pad(b), ns[0], ns[1], r, float(lora.scale), lora.h.stride(0),
             counters if shrink else y,
             len(b) * r if shrink_programs is None else shrink_programs),
            {"LORA": len(b), "LRP": triton.next_power_of_2(r), "SHRINK": shrink, "SBK": sbk})


def _pad(ts: list[Tensor]) -> list[Tensor]:
    return ts + [ts[0]] * (MAX_MEMBERS - len(ts))


@triton.jit
def lora_delta(offs_n, rows, M, N, h_ptr, b0, b1, b2, N0, N1, R, scale, stride_hm,
               dt: tl.constexpr, S: tl.constexpr, RP: tl.constexpr, H_CG: tl.constexpr):
    """The delta of output columns offs_n and rows, [BN, MP] fp32 holding dt values:
    round(scale * round(h_s[m] . B_s[n])) (module doc). The GEMVs compute it before their main
    loop (its loads then overlap the weight stream instead of adding a round trip to the
    store) and add it with `lora_add`."""
    j = tl.arange(0, RP)
    j_ok = j < R
    n_ok = offs_n < N
    member = tl.zeros_like(offs_n)
    start = tl.zeros_like(offs_n)
    if S > 1:
        in1 = offs_n >= N0
        member = tl.where(in1, 1, member)
        start = tl.where(in1, N0, start)
    if S > 2:
        in2 = offs_n >= N0 + N1
        member = tl.where(in2, 2, member)
        start = tl.where(in2, N0 + N1, start)
    brow = (offs_n - start)[:, None] * R + j[None, :]  # [BN, RP] within the member's B
    bp = b0 + brow
    if S > 1:
        bp = tl.where((member == 1)[:, None], b1 + brow, bp)
    if S > 2:
        bp = tl.where((member == 2)[:, None], b2 + brow, bp)
    b = tl.load(bp, mask=n_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)  # [BN, RP]
    hp = h_ptr + rows[None, :, None] * stride_hm + (member * R)[:, None, None] + j[None, None, :]
    h_ok = n_ok[:, None, None] & (rows < M)[None, :, None] & j_ok[None, None, :]
    if H_CG:  # h written by other programs of this launch: read it from L2
        h = tl.load(hp, mask=h_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        h = tl.load(hp, mask=h_ok, other=0.0).to(tl.float32)  # [BN, MP, RP]
    d = tl.sum(h * b[:, None, :], axis=2)  # [BN, MP]
    return (d.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)


@triton.jit
def shrink_program(PN, SHRINK: tl.constexpr):
    """Whether this program is one of the launch's first PN (grid columns of) LoRA shrink
    programs: a runtime test with SHRINK, a constant False without (only the tile code
    compiles)."""
    if SHRINK:
        return tl.program_id(0) < PN
    else:
        return False


@triton.jit
def lora_shrink_role(idx, x_ptr, stride_xm, M, K, a0, a1, a2, h_ptr, stride_hm, hc_ptr, R, SR,
                     S: tl.constexpr, MP: tl.constexpr, SBK: tl.constexpr):
    """A GEMV program in a shrink role (LoRAEpilogue.a): h[m, idx] = round(x[m] . A row idx of
    the members' stacked A) over all of K, with the separate shrink kernel's code for one row
    of A (orbit/kernels/lora_decode.py, below 8 rows), then one release increment of the
    launch's h counter. idx >= SR: nothing to do (the grid rounds up)."""
    if idx < SR:
        s = idx // R
        offs_m = tl.arange(0, MP)
        m_ok = offs_m < M
        offs_j = idx % R + tl.arange(0, 1)
        acc = _shrink_block(x_ptr, _member(s, a0, a1, a2, S), offs_m, m_ok, offs_j,
                            offs_j < R, 0, K, K, stride_xm, MP, 1, SBK, False, 1)  # [MP, 1]
        tl.store(h_ptr + offs_m[:, None] * stride_hm + (s * R + offs_j)[None, :],
                 acc.to(h_ptr.dtype.element_ty), mask=m_ok[:, None])
        tl.debug_barrier()
        tl.atomic_add(hc_ptr, 1, sem="release")


@triton.jit
def lora_shrink_role_dot(mb, x_ptr, stride_xm, M, K, a_ptr, h_ptr, stride_hm, hc_ptr, R,
                         BM: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr):
    """A `tl.dot`-loop program in a shrink role (one member, 8+ rows): h[rows mb*BM.., :] over
    all of K in one tensor-core accumulation (the separate shrink kernel splits K in chunks
    and adds them after, so a value may differ from its in the last bit; summing chunk by chunk
    here doubled the kernel's registers: 84 -> 168 at 16 rows, spills at 64, on sm_90), then
    one release increment of the launch's h counter."""
    offs_m = mb * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    offs_j = tl.arange(0, RP)
    j_ok = offs_j < R
    acc = _shrink_block(x_ptr, a_ptr, offs_m, m_ok, offs_j, j_ok, 0, K, K, stride_xm, BM, RP,
                        BK, True, 1)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :],
             acc.to(h_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])
    tl.debug_barrier()
    tl.atomic_add(hc_ptr, 1, sem="release")


@triton.jit
def lora_await(hc_ptr, SR, SPIN: tl.constexpr = 1 << 22):
    """Spin (acquire) until the launch's SR shrink signals are in: the shrink programs are the
    grid's first columns (a persistent launch's first items), so they run no later than any
    program that waits here. At most SPIN reads (seconds; a real wait takes microseconds):
    a broken schedule then gives a wrong result, which the tests catch, not a hung GPU."""
    done = tl.atomic_add(hc_ptr, 0, sem="acquire")
    spins = 0
    while (done < SR) & (spins < SPIN):
        done = tl.atomic_add(hc_ptr, 0, sem="acquire")
        spins += 1


@triton.jit
def lora_release(hc_ptr, tiles):
    """After this program read h: count it in hc_ptr[1]; the one of `tiles` readers that counts
    last re-arms both counters for the next launch (CUDA-graph replays reuse them)."""
    tl.debug_barrier()
    if tl.atomic_add(hc_ptr + 1, 1, sem="acq_rel") == tiles - 1:
        tl.atomic_xchg(hc_ptr, 0, sem="relaxed")
        tl.atomic_xchg(hc_ptr + 1, 0, sem="relaxed")


@triton.jit
def lora_await_delta(offs_n, rows, M, N, h_ptr, b0, b1, b2, N0, N1, R, scale, stride_hm, hc_ptr,
                     SR, dt: tl.constexpr, S: tl.constexpr, RP: tl.constexpr):
    """`lora_delta` once the launch's shrink programs have signalled (`lora_await`), h read
    from L2; then `lora_release` with one reader per column tile."""
    lora_await(hc_ptr, SR)
    d = lora_delta(offs_n, rows, M, N, h_ptr, b0, b1, b2, N0, N1, R, scale, stride_hm, dt, S,
                   RP, True)
    lora_release(hc_ptr, tl.cdiv(N, offs_n.shape[0]))
    return d


@triton.jit
def lora_add(acc, d, dt: tl.constexpr):
    """The adapted outputs in dt: round(round(acc) + d), d from `lora_delta`."""
    return (acc.to(dt).to(tl.float32) + d).to(dt)


@triton.jit
def lora_store_dot(acc, offs_m, offs_o, M, N, h_ptr, b_ptr, R, scale, stride_hm,
                   dt: tl.constexpr, RP: tl.constexpr, H_CG: tl.constexpr):
    """The `tl.dot` loop's form (one member; acc [BM, BO] fp32, BM >= 16, RP >= 16): the
    roundings of `lora_delta` + `lora_add`, the delta as a tensor-core dot
    `h [BM, RP] @ B^T [RP, BO]`, as the expand kernel computes it from 8 rows on. H_CG: h was
    written by this launch's shrink programs (read it from L2)."""
    y = acc.to(dt).to(tl.float32)
    j = tl.arange(0, RP)
    j_ok = j < R
    hp = h_ptr + offs_m[:, None] * stride_hm + j[None, :]
    h_ok = (offs_m < M)[:, None] & j_ok[None, :]
    if H_CG:  # h written by other programs of this launch: read it from L2
        h = tl.load(hp, mask=h_ok, other=0.0, cache_modifier=".cg")  # [BM, RP]
    else:
        h = tl.load(hp, mask=h_ok, other=0.0)
    b = tl.load(b_ptr + offs_o[:, None] * R + j[None, :],
                mask=(offs_o < N)[:, None] & j_ok[None, :], other=0.0)  # [BO, RP]
    d = tl.dot(h, tl.trans(b))  # [BM, BO] fp32
    d = (d.to(dt).to(tl.float32) * scale).to(dt).to(tl.float32)
    return (y + d).to(dt)


def lora_epilogue_reference(y_base: Tensor, lora: LoRAEpilogue) -> Tensor:
    """The unfused expand-add on a base output y_base [M, sum N_s] (out of place): each
    member's columns get round(scale * round(h_s B_s^T)) added, in torch."""
    r = lora.b[0].shape[1]
    parts, start = [], 0
    for s, bi in enumerate(lora.b):
        ys = y_base[:, start:start + bi.shape[0]]
        d = (lora.h[:, s * r:(s + 1) * r] @ bi.T).to(y_base.dtype)
        parts.append(ys + (lora.scale * d).to(y_base.dtype))
        start += bi.shape[0]
    return torch.cat(parts, dim=1)
