"""INT4 `tl.dot` steps over nibble-plane pairs (`TileConfig(unpack=UNPACK_PLANE_PAIRS)`): the
tensor-core loop of `_qgemm._qgemm_main` for decode and rollout batch sizes, without the
join tree that builds the [rows, cols] weight tile.

Why: at M = 4-16 the 4-bit formats need the tensor cores (the CUDA-core plane GEMV's work grows
with M), and the `tl.dot` loop runs INT4 4096x12288 in 32 us at every M (H100, session 13) where
FP8, which moves twice the bytes through the same loop, takes 26 us. What INT4 adds per element is
the unpack: the nibbles of a [rows, cols / 8] word tile interleaved into a [rows, cols] tile (a
`tl.join` tree: register shuffles) before the dequantize.

Design. The reduction order inside a K step is free, so the step does not rebuild columns in
order. For plane pair P (0..3), nibbles P and P + 4 of every word w[n, j] (columns 8j + P and
8j + P + 4) form a [rows, 2 * cols / 8] tile whose column 2j + h is the weight of column
8j + P + 4h, in the layout the word tile already has (`tl.join` of two same-layout tiles on a
new last dim, then a reshape that merges it: per-thread adjacent values, no shuffle); x is
loaded with the same column map (a strided load, served by L1), and one `tl.dot` per pair
accumulates (4 dots of K = cols / 4 per step instead of 1 of K = cols). Every word lies in one
scale group (groups are multiples of 8 columns), so the group scale is one value per word,
loaded as a [rows, cols / 8] tile (no [rows, groups, group] reshape).

Values: the dequantized weight rounded once to the activation dtype, as `int4_tile` + cast
does, so the products are the reference's bit for bit and only the summation order differs
(fast mode only: exact mode keeps its fixed tiles).
- Plain (any scale dtype, asymmetric codes, the CPU interpreter): u = (w >> 4P) & 0xF and
  (w >> 4P + 16) & 0xF, int4.int4_codes, * s (+ o), cast.
- ASM (CUDA, symmetric codes, bf16 scale and activations): per word, 4 instructions give both
  weights of the pair as one packed bf16x2: the word shifted by 4P, one LOP3
  `(t & 0x000F000F) | 0x43004300` (bf16 bits of 128 + u in each half), one `fma.rn.bf16x2`
  by 1 and -136 (u - 8, exact) and one by {s, s} and -0 ((u - 8) s rounded once: the bits of
  the fp32 product cast to bf16, since that product is exact in fp32). The plain path costs
  ~4.5 instructions per weight (shift, AND, OR + FADD of the 2^23 trick, FMUL, half a convert),
  this one 2.

Prediction (before any run; H100, 4096x12288 INT4 g128, M = 1-16): from the `tl.dot` loop's
32 us toward FP8's 26 us (same loop, a 1-instruction-per-element dequantize). Whether it gets
there depends on what binds the loop once the unpack is gone: the shared-memory trip of the
weight tile, which this keeps.

NVFP4 (session 14). Its bytes [N, K/2] are read as int32 words [N, K/8] (the launch views
them; byte b holds columns 2b and 2b + 1, so nibble j of a word is column 8w + j, the INT4
order) and step over the same plane pairs. Every word lies in one 16-column scale group. The
per-tensor global scale leaves the weight: it multiplies the fp32 accumulator once before the
store, so the step only needs v * s (E2M1 value times the e4m3 group scale), which is exact in
bf16 and fp16 (2 + 4 significant bits, range 2^-10..2688). One-hot rows therefore still read
back the reference's fp32 (v * s) * gs rounded once.
- Plain: E2M1 codes through `fp4._e2m1`, times the scale, cast (exact).
- ASM (CUDA, bf16 x): the magnitude bits e1 e0 m of each nibble go to bf16 bits 8..6 and the
  sign to bit 15, which is the bf16 of v * 2^-126 (e = 0 lands on the bf16 subnormals 0 and
  2^-127, which bf16 FMAs keep); one `fma.rn.bf16x2` by {s', s'}, s' = s * 2^117 (exact, at
  most 448 * 2^117), gives v * s * 2^-9, a normal bf16 (>= 2^-19), exact. The epilogue
  multiplies by gs * 2^9. Per word pair: two shifts, one LOP3 with an AND, one HFMA2.

MXFP4 (session 14) takes the same pairs with the plain decode: `fp4._e2m1` times the E8M0
scale 2^(e - 127) in fp32, cast once, which is the reference's rounding (a bf16x2 decode would
need the scale's exponent range, which E8M0 does not bound).

Register-fed (session 14): one stage, no pipeliner. Hopper's MMAs read some operands from
registers: wgmma its A operand, mma.sync (what Triton emits for 16-row tiles) both. Offline
sm_90 compiles (the device's Triton 3.6 and Triton 3.9; `scripts/bench/sass_qmm.py`) show
that with `stages=1` no weight tile goes through shared memory, swapped
(`TileConfig(swap=True)`: y^T += W @ x^T, the decoded weights the wgmma's A operand) or not
(bm = 16: mma.sync): the words are loaded, moved into the MMA operand's register layout and
decoded there, and x is the only shared-memory tile. With 3-4 stages the pipeliner stages the
words through shared memory and the decoded tile takes the trip again. Without the pipeliner
the load latency is hidden by many small programs per SM: split-K (its fix-up serves the
swapped tile too), which the tuner adds (`qmm_tune.register_fed_configs`).
"""

from __future__ import annotations

from orbit.kernels._triton import tl, triton
from orbit.kernels.fp4 import _e2m1, e8m0_scale
from orbit.kernels.int4 import int4_codes
from orbit.kernels.tile_config import UNPACK_PLANE_PAIRS

__all__ = ["NVFP4_ASM_EPILOGUE", "UNPACK_PLANE_PAIRS", "plane_pair_step"]

# What the NVFP4 ASM decode leaves out of the weights (2^-9, see the module doc): the epilogue
# multiplies the accumulator by global_scale times this.
NVFP4_ASM_EPILOGUE = tl.constexpr(512.0)
_NVFP4_ASM_SCALE = tl.constexpr(2.0 ** 117)

# The u - 8 decode of nibbles P and P + 4 of the word $2 (shifted right by 4P) into the bf16x2
# register t, exact: LOP3 (table 0xEA is (a & b) | c) writes the bf16 of 128 + u, the FMA
# subtracts 136. Uses .b32 registers t, m, c, one, neg. (int4_mma.py's INT4 decode runs it
# too, without the scale.)
U8_PAIR_DECODE_PTX = """mov.b32 m, 0x000F000F;
mov.b32 c, 0x43004300;
mov.b32 one, 0x3F803F80;
mov.b32 neg, 0xC308C308;
lop3.b32 t, $2, m, c, 0xEA;
fma.rn.bf16x2 t, t, one, neg;
"""

# asm operands: $0, $1 the bf16 weights of nibbles P and P + 4; $2 the word shifted right by
# 4P; $3 the bf16 scale.
_PAIR_ASM = tl.constexpr("""{
.reg .b32 t, s2, m, c, one, neg, nz;
""" + U8_PAIR_DECODE_PTX + """mov.b32 nz, 0x80008000;
mov.b32 s2, {$3, $3};
fma.rn.bf16x2 t, t, s2, nz;
mov.b32 {$0, $1}, t;
}""")


@triton.jit
def _pair_plain(words, sc, off, P: tl.constexpr, HAS_OFFSET: tl.constexpr, dt: tl.constexpr):
    """Nibbles P and P + 4 of int32 words as dequantized weights in dt (two tiles)."""
    lo = int4_codes((words >> (4 * P)) & 0xF, not HAS_OFFSET)
    hi = int4_codes((words >> (4 * P + 16)) & 0xF, not HAS_OFFSET)
    if HAS_OFFSET:
        return (lo * sc + off).to(dt), (hi * sc + off).to(dt)
    return (lo * sc).to(dt), (hi * sc).to(dt)


@triton.jit
def _pair_asm(words, sc16, P: tl.constexpr):
    """_pair_plain for symmetric codes with a bf16 scale `sc16`, in 4 instructions per word."""
    if P == 0:
        t = words
    else:
        t = words >> (4 * P)
    return tl.inline_asm_elementwise(_PAIR_ASM, "=h,=h,r,h", [t, sc16],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


# $0, $1 the bf16 weights; $2 the bf16 bits of both nibbles' v * 2^-126; $3 the bf16 s'.
# (int4_mma.py's NVFP4 decode runs the same text)
E2M1_PAIR_PTX = """{
.reg .b32 s2, nz, t;
mov.b32 nz, 0x80008000;
mov.b32 s2, {$3, $3};
fma.rn.bf16x2 t, $2, s2, nz;
mov.b32 {$0, $1}, t;
}"""
_E2M1_PAIR_ASM = tl.constexpr(E2M1_PAIR_PTX)


@triton.jit
def _e2m1_pair_plain(words, sc, P: tl.constexpr, dt: tl.constexpr):
    """Nibbles P and P + 4 of int32 words of E2M1 codes as v * s in dt (two tiles; exact)."""
    lo = _e2m1((words >> (4 * P)) & 0xF)
    hi = _e2m1((words >> (4 * P + 16)) & 0xF)
    return (lo * sc).to(dt), (hi * sc).to(dt)


@triton.jit
def _e2m1_pair_asm(words, sc16, P: tl.constexpr):
    """_e2m1_pair_plain times 2^-9 for bf16, `sc16` the bf16 s * 2^117: nibble bits 2..0 to
    bf16 bits 8..6 (one shift; arithmetic shifts only fill bits the mask drops), bit 3 to bit
    15 (another), in both 16-bit halves, then one packed FMA."""
    if P == 0:
        mag = words << 6
        sgn = words << 12
    elif P == 1:
        mag = words << 2
        sgn = words << 8
    elif P == 2:
        mag = words >> 2
        sgn = words << 4
    else:
        mag = words >> 6
        sgn = words
    bits = (mag & 0x01C001C0) | (sgn & -2147450880)  # 0x80008000 as an int32
    return tl.inline_asm_elementwise(_E2M1_PAIR_ASM, "=h,=h,r,h", [bits, sc16],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)


@triton.jit
def plane_pair_step(acc, x_ptr, stride_xm, q_ptr, s_ptr, o_ptr, stride_q, stride_s, offs_m,
                    offs_o, M, N, K, r0, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
                    BR: tl.constexpr, ASM: tl.constexpr, FMT: tl.constexpr = 0,
                    SWAP: tl.constexpr = False):
    """acc [BM, BO] += x[offs_m, r0:r0+BR] @ W[offs_o, r0:r0+BR]^T for W packed in int32 words
    [N, K/8] with scales [N, K/GROUP]; r0 is a multiple of BR, BR of 64. FMT 0: int4 (ASM: the
    bf16x2 decode, symmetric codes, bf16 scale and x). FMT 3: nvfp4 E2M1 codes with e4m3
    scales, WITHOUT the global scale (the caller's epilogue: gs, or gs * NVFP4_ASM_EPILOGUE
    with ASM, bf16 x). FMT 4: mxfp4 E2M1 codes with E8M0 scales (no ASM). SWAP: acc is the
    [BO, BM] tile of y^T += W @ x^T, the decoded weights the MMA's A operand (see the module
    doc: "Register-fed")."""
    KW: tl.constexpr = BR // 8
    dt = x_ptr.dtype.element_ty
    aw = tl.arange(0, KW)
    col = r0 + aw * 8  # first column of each word
    row_ok = offs_o < N
    wmask = row_ok[:, None] & (col < K)[None, :]
    words = tl.load(q_ptr + offs_o[:, None] * stride_q + (r0 // 8 + aw)[None, :], mask=wmask,
                    other=0)
    sp = offs_o[:, None] * stride_s + (col // GROUP)[None, :]
    off = 0.0  # (unused unless HAS_OFFSET)
    if FMT == 4:  # MXFP4: E8M0 exponent bytes, 2^(e - 127) (plain decode only)
        sc = e8m0_scale(tl.load(s_ptr + sp, mask=wmask, other=0).to(tl.int32))
    elif FMT == 3:
        sc = tl.load(s_ptr + sp, mask=wmask, other=0.0).to(tl.float32)
        if ASM:
            sc = (sc * _NVFP4_ASM_SCALE).to(tl.bfloat16)  # exact: s' = s * 2^117 <= 1.75 * 2^125
    elif ASM:
        sc = tl.load(s_ptr + sp, mask=wmask, other=0.0)
    else:
        sc = tl.load(s_ptr + sp, mask=wmask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            off = tl.load(o_ptr + sp, mask=wmask, other=0.0).to(tl.float32)
    # column 2j + h of a pair's tile is weight column 8j + P + 4h
    a2 = tl.arange(0, 2 * KW)
    xcol = r0 + (a2 // 2) * 8 + (a2 % 2) * 4
    xmask = (offs_m < M)[:, None] & (xcol < K)[None, :]
    xbase = x_ptr + offs_m[:, None] * stride_xm + xcol[None, :]
    for P in tl.static_range(4):
        if FMT == 0:
            if ASM:
                lo, hi = _pair_asm(words, sc, P)
            else:
                lo, hi = _pair_plain(words, sc, off, P, HAS_OFFSET, dt)
        elif FMT == 3 and ASM:
            lo, hi = _e2m1_pair_asm(words, sc, P)
        else:  # E2M1 codes (nvfp4 without ASM, mxfp4)
            lo, hi = _e2m1_pair_plain(words, sc, P, dt)
        w = tl.reshape(tl.join(lo, hi), (lo.shape[0], 2 * KW))  # [BO, 2 KW]
        xp = tl.load(xbase + P, mask=xmask, other=0.0)  # [BM, 2 KW]
        if SWAP:
            acc = tl.dot(w, tl.trans(xp), acc)
        else:
            acc = tl.dot(xp, tl.trans(w), acc)
    return acc
