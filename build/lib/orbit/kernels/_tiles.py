"""Triton helpers that several weight-tile loaders share (group scales, packed-code unpacking).

UNPACK selects how packed codes become a [ROWS, COLS] tile; all compute the same values and
are kept so the benchmark can compare them on the device (docs/kernels.md has the numbers):
0 = shift a [ROWS, COLS/P, P] tensor and reshape it; 1 = every element loads its own word
and shifts (no reshape; measured 5-10x slower); 2 = a tree of `tl.join`s, whose trailing
size-2 dims reshape without moving data between threads (fastest for int4 words).
"""

from __future__ import annotations

from orbit.kernels._triton import tl, triton


@triton.jit
def group_affine(v, s_ptr, o_ptr, stride_s, offs_n, row_ok, k0, K, GROUP: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """v * s (+ o) for the float32 tile v = W[offs_n, k0:k0+COLS] with one scale (and offset)
    per GROUP columns. One scale per row when the tile sits in one group; otherwise the
    [ROWS, COLS/GROUP] scales multiply a [ROWS, COLS/GROUP, GROUP] view (a per-element gather
    of the scales measured 5-10x slower on the H100, docs/kernels.md). Scale and offset are
    each loaded in their own dtype (Triton specializes on the pointer type) and widened to
    fp32, so e.g. a bf16 scale may come with an fp32 offset."""
    if COLS <= GROUP:
        sp = offs_n * stride_s + k0 // GROUP
        s = tl.load(s_ptr + sp, mask=row_ok, other=0.0).to(tl.float32)[:, None]  # [ROWS, 1]
        if HAS_OFFSET:
            w = v * s + tl.load(o_ptr + sp, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        else:
            w = v * s
    else:
        offs_g = k0 // GROUP + tl.arange(0, COLS // GROUP)
        sp = offs_n[:, None] * stride_s + offs_g[None, :]
        gmask = row_ok[:, None] & (offs_g[None, :] < K // GROUP)
        s = tl.load(s_ptr + sp, mask=gmask, other=0.0).to(tl.float32)  # [ROWS, COLS/G]
        v3 = tl.reshape(v, (ROWS, COLS // GROUP, GROUP))
        if HAS_OFFSET:
            z = tl.load(o_ptr + sp, mask=gmask, other=0.0).to(tl.float32)
            w3 = v3 * s[:, :, None] + z[:, :, None]
        else:
            w3 = v3 * s[:, :, None]
        w = tl.reshape(w3, (ROWS, COLS))
    return w


@triton.jit
def unpack_nibbles(q_ptr, stride_q, offs_n, row_ok, k0, K, PER_WORD: tl.constexpr,
                   ROWS: tl.constexpr, COLS: tl.constexpr, UNPACK: tl.constexpr):
    """Nibbles of W[offs_n, k0:k0+COLS] as int32 [ROWS, COLS]; PER_WORD = 8 (int32 words) or
    2 (bytes); nibble j of a word is bits 4j..4j+3 and column word*PER_WORD + j."""
    if UNPACK == 1:
        offs_k = k0 + tl.arange(0, COLS)
        words = tl.load(q_ptr + offs_n[:, None] * stride_q + (offs_k // PER_WORD)[None, :],
                        mask=row_ok[:, None] & (offs_k[None, :] < K), other=0).to(tl.int32)
        u = (words >> ((offs_k % PER_WORD) * 4)[None, :]) & 0xF
    else:
        offs_w = k0 // PER_WORD + tl.arange(0, COLS // PER_WORD)
        words = tl.load(q_ptr + offs_n[:, None] * stride_q + offs_w[None, :],
                        mask=row_ok[:, None] & (offs_w[None, :] < K // PER_WORD),
                        other=0).to(tl.int32)  # [ROWS, COLS/PER_WORD]
        if UNPACK == 0:
            shifts = tl.arange(0, PER_WORD) * 4
            u3 = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [ROWS, COLS/P, P]
            u = tl.reshape(u3, (ROWS, COLS))
        else:
            if PER_WORD == 8:
                h = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF)  # [R, W, 2]: halves
                b = tl.join(h & 0xFF, h >> 8)  # [R, W, 2, 2]: bytes
                n = tl.join(b & 0xF, b >> 4)  # [R, W, 2, 2, 2]: nibbles, index 4i+2j+k
            else:
                n = tl.join(words & 0xF, (words >> 4) & 0xF)  # [R, W, 2]: low nibble first
            u = tl.reshape(n, (ROWS, COLS))
    return u
