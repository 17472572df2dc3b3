"""CPU checks of the Gluon INT4 mma.sync kernel (orbit/kernels/int4_mma.py): its config rule
against the H100 sweep it was fitted to, the operands it takes, and its sm_90 compile (Gluon
has no interpreter, so its numbers are checked on the GPU: tests/gpu/test_int4_mma_gpu.py).
The compile proves what the design rests on: the decoded weights and x reach the MMA through
trivial layout conversions (convert_layout(assert_trivial=True) would fail the compile), no
shared memory in the K loop, no spills, and a loop of about 2.8 instructions per weight."""

from __future__ import annotations

import pytest
import torch

from orbit.kernels import int4_mma
from orbit.kernels.int4_mma import MmaConfig, mma_columns, pick_config, supports

SHIPPED_WARP_K = int4_mma.WARP_K


@pytest.fixture(autouse=True)
def _split_k_pick(monkeypatch):
    """Most tests here build their form (ring, TMA, L2 prefetch, chains, staged x) on the
    split-K pick, which MmaConfig.kw excludes: they get the pick with WARP_K = 1. The tests
    of the shipped rule set WARP_K back to SHIPPED_WARP_K."""
    monkeypatch.setattr(int4_mma, "WARP_K", 1)

# (in, out, M) -> the best split of the session-21 H100 sweeps (docs/benchmarks.md) with
# the row tiling the rule uses (1 up to 8 rows, 2 from 9): the rule must pick it
SWEEP_BEST = {(4096, 12288, 4): (1, 4), (4096, 12288, 16): (2, 4),
              (2048, 12288, 4): (1, 4), (2048, 12288, 16): (2, 4),
              (6144, 2048, 4): (1, 8), (6144, 2048, 16): (2, 8),
              (2048, 4096, 4): (1, 4), (2048, 4096, 16): (2, 4)}


@pytest.mark.parametrize("key", sorted(SWEEP_BEST))
@pytest.mark.parametrize("warp_k", [1, SHIPPED_WARP_K])
def test_pick_reproduces_the_sweep(monkeypatch, key: tuple[int, int, int], warp_k: int) -> None:
    monkeypatch.setattr(int4_mma, "WARP_K", warp_k)
    k, n, m = key
    cfg = pick_config(m, k, n, 128, 132)
    # (the sweep's split: K parts, as programs or, int4_mma.WARP_K, as warps along K)
    assert (cfg.row_tiles, cfg.split * cfg.kw) == SWEEP_BEST[key]
    assert cfg.warps * cfg.kw == max(4, cfg.kw)
    # two steps ahead only in the warps-along-K form up to 8 rows (KW_DEEP_PREFETCH_MAX_M)
    assert cfg.prefetch == (2 if cfg.kw > 1 and m <= 8 else 1)
    assert cfg.x_prefetch == (m > 8)


@pytest.mark.parametrize("m", [1, 4, 8, 9, 16])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "fp8"])
def test_deep_prefetch_follows_the_per_format_rows(monkeypatch, m: int, fmt: str) -> None:
    """KW_DEEP_PREFETCH_MAX_M: INT4 (session 33) and NVFP4 (session 34) up to 8 rows measured
    faster; FP8 lost in the engine and keeps one step ahead; a format's entry moves its rows."""
    monkeypatch.setattr(int4_mma, "WARP_K", SHIPPED_WARP_K)
    k, group = (4096, 128)
    cfg = pick_config(m, k, 12288, group, 132, fmt)
    assert cfg.kw > 1
    assert cfg.prefetch == (2 if fmt in ("int4", "nvfp4") and m <= 8 else 1)
    monkeypatch.setitem(int4_mma.KW_DEEP_PREFETCH_MAX_M, fmt, 16)
    deep = pick_config(m, k, 12288, group, 132, fmt)
    # (FP8's deep form: 3 steps ahead in 8-warp programs, KW_DEEP_FORM; the others 2 steps
    # in the kw pick's own warps)
    steps, warps = int4_mma.KW_DEEP_FORM.get(fmt, (2, cfg.num_warps))
    assert (deep.prefetch, deep.num_warps, deep.kw) == (steps, warps, cfg.kw)


def test_fp8_deep_form_is_eight_warps_three_steps_ahead(monkeypatch) -> None:
    """KW_DEEP_FORM["fp8"] = (3, 8): at kw 4 two warps over N, at kw 8 one (session 35's
    fastest FP8 forms on every Qwen3 shape); off until KW_DEEP_PREFETCH_MAX_M gives FP8 rows."""
    monkeypatch.setattr(int4_mma, "WARP_K", SHIPPED_WARP_K)
    assert pick_config(4, 2048, 4096, 128, 132, "fp8").prefetch == 1
    monkeypatch.setitem(int4_mma.KW_DEEP_PREFETCH_MAX_M, "fp8", 8)
    for (k, n), (kw, wn) in {(2048, 4096): (4, 2), (6144, 2048): (8, 1)}.items():
        cfg = pick_config(4, k, n, 128, 132, "fp8")
        assert (cfg.kw, cfg.warps, cfg.prefetch) == (kw, wn, 3), (k, n, cfg)


def test_pick_ring_depth_is_clamped_to_the_slice(monkeypatch) -> None:
    from orbit.kernels import int4_mma

    assert pick_config(4, 4096, 12288, 128, 132).stages == 0  # the shipped default
    monkeypatch.setattr(int4_mma, "RING_STAGES", 6)
    deep = pick_config(4, 4096, 12288, 128, 132)  # split 4: 8 steps of 128 per slice
    shallow = pick_config(4, 2048, 6144, 128, 132)  # split 4: 4 steps
    assert (deep.split, deep.stages) == (4, 6)
    assert (shallow.split, shallow.stages) == (4, 4)


def test_pick_keeps_whole_steps_per_slice() -> None:
    for k in (576, 1536, 2048, 4096, 6144, 8192):
        for group in (64, 128, 256):
            if k % group:
                continue
            cfg = pick_config(4, k, 2048, group, 132)
            step = 32 * (4 if group % 128 == 0 else 2)
            assert k % (cfg.split * step) == 0 and k // cfg.split >= 2 * step or cfg.split == 1


def test_supports_only_what_it_computes() -> None:
    bf = torch.bfloat16
    assert supports(4, 4096, 12288, 128, bf, bf, False)
    assert supports(16, 2048, 2048, 64, bf, bf, False)
    assert supports(2, 4096, 512, 256, bf, bf, False)
    assert supports(32, 4096, 512, 128, bf, bf, False)
    assert not supports(33, 4096, 512, 128, bf, bf, False)  # M
    assert not supports(0, 4096, 512, 128, bf, bf, False)
    assert not supports(4, 4096, 512, 32, bf, bf, False)  # group 32 (GGUF Q4_0 / Q4_1)
    assert not supports(4, 4096, 512, 128, bf, bf, True)  # asymmetric codes
    assert not supports(4, 4096, 512, 128, torch.float16, bf, False)
    assert not supports(4, 4096, 512, 128, bf, torch.float32, False)
    assert not supports(4, 4000, 512, 128, bf, bf, False)  # group does not divide K
    e4m3 = torch.float8_e4m3fn
    assert supports(4, 2048, 512, 16, bf, e4m3, False, "nvfp4")
    assert not supports(4, 2048 + 64, 512, 16, bf, e4m3, False, "nvfp4")  # 128-deep steps
    assert not supports(4, 2048, 512, 16, bf, bf, False, "nvfp4")  # scales must be e4m3
    assert not supports(4, 2048, 512, 32, bf, torch.uint8, False, "mxfp4")
    f32 = torch.float32
    assert supports(16, 2048 + 64, 512, 128, bf, f32, False, "fp8")  # 64-deep FP8 steps
    assert not supports(4, 2048 + 32, 512, 128, bf, f32, False, "fp8")
    assert not supports(4, 2048, 512, 128, bf, bf, False, "fp8")  # fp32 block scales
    assert not supports(4, 2048, 512, 64, bf, f32, False, "fp8")  # 128x128 blocks only
    assert not supports(4, 2048, 512, 128, torch.float16, f32, False, "fp8")  # W8A16: bf16 x


def test_block_n() -> None:
    assert MmaConfig(4, 1).block_n == 64 and MmaConfig(8, 2).block_n == 256


def _tool():
    pytest.importorskip("triton.experimental.gluon")
    from bench_scripts import load_bench

    bin_dir = load_bench("sm90_compile").BIN
    if not ((bin_dir / "ptxas").exists() and (bin_dir / "cuobjdump").exists()):
        pytest.skip("this Triton ships no ptxas / cuobjdump")
    return load_bench("sass_int4_mma")


@pytest.mark.parametrize("m,group", [(4, 128), (16, 128), (3, 64), (32, 128), (24, 64)])
def test_sm90_compile_keeps_weights_in_registers(m: int, group: int) -> None:
    tool = _tool()
    cfg = pick_config(m, 4096, 12288, group, 132)
    kernel = tool.compile_mma(cfg, m, group)
    sass = tool.disassemble(kernel.asm["cubin"])
    n, ops, _ = tool.loop_budget(sass, key="HMMA")
    weights = 16 * cfg.row_tiles * 32 * (4 if group == 128 else 2) // 32
    np_ = mma_columns(m)
    # one m16n8k16 MMA per 16 x 16 weights and 8 columns of x
    assert ops["HMMA"] == cfg.row_tiles * (32 * (4 if group == 128 else 2) // 16) * (np_ // 8)
    assert ops["LDS"] == 0 and ops["STS"] == 0 and ops["LDSM"] == 0  # no shared memory
    assert ops["LOP3"] == ops["HFMA2"] == weights // 2  # the decode: 2 per nibble pair
    # (64-deep steps: more overhead; 32 columns: 4 MMAs and 4 x pieces per 16 x 16 weights)
    assert n < (3.2 if group % 128 == 0 else 3.6) * weights * (1.7 if np_ == 32 else 1)
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])  # no spills


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("nvfp4", 16), ("fp8", 128)])
def test_sm90_compile_pdl_loads_weights_before_the_wait(fmt: str, group: int) -> None:
    """The PDL form (MmaConfig.pdl): the first step's weight words and scales are loaded
    before griddepcontrol.wait (frozen: no kernel writes them), x after it; the K loop is the
    plain form's."""
    import dataclasses

    from bench_scripts import load_bench

    tool = _tool()
    op = load_bench("sm90_compile").SASS_OP
    cfg = pick_config(4, 4096, 12288, group, 132, fmt)
    plain = tool.disassemble(tool.compile_mma(cfg, 4, group, fmt=fmt).asm["cubin"])
    sass = tool.disassemble(tool.compile_mma(dataclasses.replace(cfg, pdl=True), 4, group,
                                             fmt=fmt).asm["cubin"])
    ops = [m_.group(2) for m_ in op.finditer(sass)]
    assert "ACQBULK" not in [m_.group(2) for m_ in op.finditer(plain)]
    wait = ops.index("ACQBULK")  # griddepcontrol.wait
    assert ops[wait + 1:wait + 4].count("PREEXIT") == 1  # launch_dependents right after it
    assert ops[:wait].count("LDG") >= 2  # words and scale of the first step
    assert tool.loop_budget(sass, key="HMMA")[0] == tool.loop_budget(plain, key="HMMA")[0]


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("nvfp4", 16, 4)])
def test_sm90_compile_l2_slice_prefetch_is_one_instruction_before_the_wait(
        fmt: str, group: int, m: int) -> None:
    """MmaConfig.l2: each thread issues one bulk L2 prefetch (its row's share of the K slice)
    first, before griddepcontrol.wait under PDL, and the K loop stays the plain form's size
    (within 3%: ptxas schedules it a little differently)."""
    import dataclasses

    from bench_scripts import load_bench

    tool = _tool()
    op = load_bench("sm90_compile").SASS_OP
    cfg = dataclasses.replace(pick_config(m, 4096, 12288, group, 132, fmt), pdl=True)
    plain = tool.compile_mma(cfg, m, group, fmt=fmt)
    pre = tool.compile_mma(dataclasses.replace(cfg, l2=True), m, group, fmt=fmt)
    assert "cp.async.bulk.prefetch.L2" not in plain.asm["ptx"]
    assert pre.asm["ptx"].count("cp.async.bulk.prefetch.L2") == 1
    sass = tool.disassemble(pre.asm["cubin"])
    ops = [m_.group(2) for m_ in op.finditer(sass)]
    pf = [i for i, o in enumerate(ops) if o == "UBLKPF"]  # the bulk prefetch
    assert len(pf) == 1 and pf[0] < ops.index("ACQBULK")
    n_pre = tool.loop_budget(sass, key="HMMA")[0]
    n_plain = tool.loop_budget(tool.disassemble(plain.asm["cubin"]), key="HMMA")[0]
    assert abs(n_pre - n_plain) <= 0.03 * n_plain, (n_pre, n_plain)


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("nvfp4", 16, 4)])
def test_sm90_compile_ring_streams_words_through_shared_memory(fmt: str, group: int,
                                                               m: int) -> None:
    """The cp.async ring (MmaConfig.stages): the K loop issues one 16-byte LDGSTS per 16-row
    tile and reads its words back with 16-byte LDS (no word LDG left in it), the shared
    allocation is the ring, and the decode is the register form's instruction for
    instruction."""
    import dataclasses

    tool = _tool()
    cfg = pick_config(m, 4096, 12288, group, 132, fmt)
    plain = tool.disassemble(tool.compile_mma(cfg, m, group, fmt=fmt).asm["cubin"])
    ring_cfg = dataclasses.replace(cfg, stages=4)
    kernel = tool.compile_mma(ring_cfg, m, group, fmt=fmt)
    sass = tool.disassemble(kernel.asm["cubin"])
    _, ops, _ = tool.loop_budget(sass, key="HMMA")
    _, plain_ops, _ = tool.loop_budget(plain, key="HMMA")
    tiles = 2 * cfg.row_tiles  # a warp's 16-row tile is two 8-row halves per thread
    assert ops["LDGSTS"] == tiles and "LDGSTS.E.BYPASS.128" in sass
    assert ops["LDG"] == plain_ops["LDG"] - tiles  # only x and the scales stay LDG
    assert kernel.metadata.shared >= 4 * cfg.block_n * 64  # 4 steps of 64 bytes per row
    for op in ("HMMA", "HFMA2", "HMUL2"):
        assert ops[op] == plain_ops[op]
    assert ops["LOP3"] <= plain_ops["LOP3"] + 2  # (the ring slot's index)
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def _against_pick(fmt: str, group: int, m: int, **change):
    """The 4096x12288 pick at M = m and the pick with `change`, compiled for sm_90: (tool,
    pick, changed kernel, its SASS, the pick's SASS, their K loops' opcode counts)."""
    import dataclasses

    tool = _tool()
    cfg = pick_config(m, 4096, 12288, group, 132, fmt)
    plain = tool.disassemble(tool.compile_mma(cfg, m, group, fmt=fmt).asm["cubin"])
    kernel = tool.compile_mma(dataclasses.replace(cfg, **change), m, group, fmt=fmt)
    sass = tool.disassemble(kernel.asm["cubin"])
    return (tool, cfg, kernel, sass, plain, tool.loop_budget(sass, key="HMMA")[1],
            tool.loop_budget(plain, key="HMMA")[1])


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("int4", 64, 4),
                                         ("nvfp4", 16, 4), ("fp8", 128, 4)])
def test_sm90_compile_tma_ring_copies_words_with_one_bulk_copy_per_step(fmt: str, group: int,
                                                                        m: int) -> None:
    """The TMA ring (MmaConfig.tma): the K loop's words come from one 2-D TMA copy per step
    (UTMALDG, issued by one thread) and 16-byte shared loads, one per 8-row half of a 16-row
    tile, no word LDG left; it waits on the slot's mbarrier; the shared allocation holds the
    ring; the decode and the MMAs are the register form's instruction for instruction."""
    tool, cfg, kernel, sass, _, ops, plain_ops = _against_pick(fmt, group, m, tma=4)
    tiles = 2 * cfg.row_tiles
    assert ops["UTMALDG"] == 1 and ops["SYNCS"] >= 1  # the refill and the slot's wait
    assert ops["LDG"] == plain_ops["LDG"] - tiles  # only x and the scales stay LDG
    assert ops["LDS"] == tiles and sass.count("LDS.128") + sass.count("LDS.64") >= tiles
    assert kernel.metadata.shared >= 4 * cfg.block_n * 16 * (4 if group % 128 == 0 or
                                                             fmt != "int4" else 2)
    for op in ("HMMA", "HFMA2", "HMUL2"):
        assert ops[op] == plain_ops[op]
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("nvfp4", 16, 4),
                                         ("nvfp4", 16, 16)])
def test_sm90_compile_two_chains_split_each_step_into_independent_mmas(fmt: str, group: int,
                                                                      m: int) -> None:
    """MmaConfig.chains = 2: the halves of the word and x tiles reach the MMA with no data
    movement (the compile's assert_trivial), the same decode and MMA count per step. INT4: the
    step's HMMAs form two chains (two start from zero), joined by one FADD per accumulator
    register; NVFP4: two accumulators carried over the loop (the same HMMA count, no new
    chain starts in the loop)."""
    tool, cfg, kernel, sass, plain, ops, plain_ops = _against_pick(fmt, group, m, chains=2)
    for op in ("HMMA", "HFMA2", "HMUL2", "LDG"):
        assert ops[op] == plain_ops[op]
    if fmt == "int4":
        def starts(text: str) -> int:
            return sum(1 for ln in text.splitlines()
                       if "HMMA" in ln and ln.split(";")[0].endswith("RZ"))

        assert starts(sass) == 2 * starts(plain)
        assert ops["FADD"] >= plain_ops["FADD"] + 4 * cfg.row_tiles * (2 if m > 8 else 1)
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("int4", 64, 4),
                                         ("nvfp4", 16, 4), ("fp8", 128, 4)])
def test_sm90_compile_x_smem_reads_the_operand_from_shared_memory(fmt: str, group: int,
                                                                  m: int) -> None:
    """MmaConfig.x_smem: the K loop reads x's B operand with 16-byte LDS and loads no x
    (only the words and the scales stay LDG), the repacking of x into the operand's pairs is
    gone (fewer PRMT), the decode and the MMAs are the register form's instruction for
    instruction; the slice is loaded with 16-byte LDG all issued before the first STS, one
    CTA barrier follows the staging, and the shared allocation holds the slice."""
    from orbit.kernels.int4_mma import x_smem_bytes

    tool, cfg, kernel, sass, plain, ops, plain_ops = _against_pick(fmt, group, m, x_smem=True)
    for op in ("HMMA", "HFMA2", "HMUL2"):
        assert ops[op] == plain_ops[op]
    assert ops["LDG"] < plain_ops["LDG"] and ops["LDS"] >= 1
    assert ops["PRMT"] <= plain_ops["PRMT"]
    if fmt != "fp8":  # (FP8's x order needs no pairs)
        assert ops["PRMT"] < plain_ops["PRMT"] // 2
    lines = [ln.split("*/", 1)[1].strip() for ln in sass.splitlines() if "*/" in ln]
    first_sts = next(i for i, ln in enumerate(lines) if ln.startswith("STS"))
    staged = sum(1 for ln in lines[:first_sts] if ln.startswith("LDG.E.128"))
    assert staged >= x_smem_bytes(m, 4096 // cfg.split) // (32 * cfg.warps * 16), staged
    assert sass.count("BAR.SYNC") == plain.count("BAR.SYNC") + 1
    assert kernel.metadata.shared >= x_smem_bytes(m, 4096 // cfg.split)
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


@pytest.mark.parametrize("m", [4, 16])
def test_sm90_compile_nvfp4(m: int) -> None:
    """The NVFP4 form: the scale tile joins into the word layout and the E2M1 pairs into the
    A operand without data movement (assert_trivial), one packed multiply per nibble pair
    (ptxas turns the FMA by -0 into HMUL2), no shared memory in the loop, no spills."""
    tool = _tool()
    cfg = pick_config(m, 4096, 12288, 16, 132, "nvfp4")
    kernel = tool.compile_mma(cfg, m, 16, fmt="nvfp4")
    sass = tool.disassemble(kernel.asm["cubin"])
    n, ops, _ = tool.loop_budget(sass, key="HMMA")
    weights = 16 * cfg.row_tiles * 128 // 32
    assert ops["HMUL2"] + ops["HFMA2"] == weights // 2
    assert ops["LDS"] == 0 and ops["STS"] == 0 and ops["LDSM"] == 0
    assert n < 4.6 * weights
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def test_fp8_decode_bits_are_exact_for_every_code() -> None:
    """The arithmetic of int4_mma's FP8 decode (_E4M3_WORD_ASM), in torch: a byte's sign to
    bf16 bit 15 and its exponent and mantissa to bits 10..4 read as a bf16 that is the e4m3
    value times 2^-120 (a bf16 subnormal for the smallest codes), and one bf16 multiply by
    2^120 gives the value back, for all 254 codes that are not NaN. The word form: the odd
    bytes of a word sit at bits 15..8 / 31..24, the even ones after a shift left by 8."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.int32)
    want = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    half = ((codes & 0x80) << 8) | ((codes & 0x7F) << 4)  # what each 16-bit half gets
    scaled = half.to(torch.int16).view(torch.bfloat16)
    assert torch.equal(scaled.float() * 2.0 ** 120, want)  # the 2^-120 is exact
    got = (scaled * torch.tensor(2.0 ** 120, dtype=torch.bfloat16)).float()
    assert torch.equal(got, want)  # and so is the bf16 multiply back (0x7B80 = 2^120)
    assert torch.tensor([0x7B80], dtype=torch.int16).view(torch.bfloat16).item() == 2.0 ** 120
    word = (codes[:4] | (codes[4:8] << 8) | (codes[8:12] << 16) | (codes[12:16] << 24))
    odd = (word & 0x80008000) | ((word & 0x7F007F00) >> 4)  # bytes 1 and 3
    even = ((word << 8) & 0x80008000) | (((word << 8) & 0x7F007F00) >> 4)  # bytes 0 and 2
    assert torch.equal(odd & 0xFFFF, half[4:8]) and torch.equal((odd >> 16) & 0xFFFF, half[12:16])
    assert torch.equal(even & 0xFFFF, half[:4]) and torch.equal((even >> 16) & 0xFFFF, half[8:12])


@pytest.mark.parametrize("m", [4, 16])
def test_sm90_compile_fp8(m: int) -> None:
    """The FP8 form: e4m3 bytes decoded in registers into the A operand (assert_trivial), one
    packed multiply by 2^120 per byte pair, no shared memory in the loop, no spills, and a
    loop lighter per byte of weight than INT4's (~4 instructions per FP8 weight, one byte,
    against ~2.8 per INT4 weight, half a byte)."""
    tool = _tool()
    cfg = pick_config(m, 4096, 12288, 128, 132, "fp8")
    kernel = tool.compile_mma(cfg, m, 128, fmt="fp8")
    sass = tool.disassemble(kernel.asm["cubin"])
    n, ops, _ = tool.loop_budget(sass, key="HMMA")
    weights = 16 * cfg.row_tiles * 64 // 32  # per thread per 64-deep step
    np_ = mma_columns(m)
    assert ops["HMMA"] == cfg.row_tiles * (64 // 16) * (np_ // 8)
    assert ops["HMUL2"] + ops["HFMA2"] == weights // 2
    assert ops["LDS"] == 0 and ops["STS"] == 0 and ops["LDSM"] == 0
    assert n < 4.6 * weights
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def test_route_sends_fitting_rows_to_mma(monkeypatch) -> None:
    """The routing rule on a (pretended) sm_90 device: INT4 and NVFP4 forwards within their
    MMA_ROWS with operands int4_mma takes -> "mma", before any route table; and every
    store-epilogue question then says no, so callers run their epilogues separately. Without
    mma_ok (an epilogue was asked for, or the operands do not fit), outside the format's rows,
    for a format without an entry, or with the entry removed, the route is not mma."""
    from orbit.kernels import _qgemm, int4_mma

    if not int4_mma.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    monkeypatch.setattr(_qgemm, "_capability", lambda device: (9, 0))
    cuda = torch.device("cuda", 0)
    assert set(_qgemm.MMA_ROWS) <= set(int4_mma.FORMATS)
    for fmt, (lo, hi) in _qgemm.MMA_ROWS.items():
        # (a deep weight for formats with a K / N rule: a down projection)
        k, n = (6144, 2048) if fmt in _qgemm.MMA_MIN_K_OVER_N else (2048, 6144)
        assert 1 <= lo <= hi <= int4_mma.MAX_M
        for m in range(lo, hi + 1):
            assert _qgemm.route(m, n, k, fmt, False, cuda, mma_ok=True).kind == "mma"
            assert not _qgemm.lora_fits(m, n, k, fmt, False, cuda, 1, mma_ok=True)
            assert not _qgemm.swiglu_fits(m, n, k, fmt, False, cuda, mma_ok=True)
            assert not _qgemm.norm_fits(m, n, k, fmt, False, cuda, mma_ok=True)
            assert not _qgemm.prenorm_fits(m, n, k, fmt, False, cuda, mma_ok=True)
        for m in (lo - 1, hi + 1):
            assert not _qgemm._mma_by_rule(m, n, k, fmt, cuda)
        assert _qgemm.route(lo, n, k, fmt, True, cuda, mma_ok=True).kind == "dot"  # exact
        assert _qgemm.route(lo, n, k, fmt, False, cuda, transpose=True,
                            mma_ok=True).kind != "mma"
        assert not _qgemm._mma_by_rule(lo, n, k, fmt, torch.device("cpu"))
    # the measured ranges (since warps along K, session 30: INT4 from batch 1 too; session
    # 31: INT4 to 32 rows; session 35: NVFP4 to 32 rows, FP8 at 2-8 rows on every shape)
    assert _qgemm.MMA_ROWS == {"int4": (1, 32), "nvfp4": (1, 32), "fp8": (2, 8)}
    assert not _qgemm.MMA_MIN_K_OVER_N
    assert _qgemm._mma_by_rule(4, 6144, 2048, "fp8", cuda)  # 2048x6144: a wide weight
    assert not _qgemm._mma_by_rule(1, 2048, 6144, "fp8", cuda)  # one row: the FP8 GEMV
    monkeypatch.setitem(_qgemm.MMA_ROWS, "nvfp4", (1, 0))  # an emptied range: off
    assert not _qgemm._mma_by_rule(4, 6144, 2048, "nvfp4", cuda)
    # a K / N rule (sessions 24-34 FP8's): only deep weights (K >= 3 N) take the route
    monkeypatch.setitem(_qgemm.MMA_MIN_K_OVER_N, "fp8", 3)
    assert _qgemm.route(4, 2048, 6144, "fp8", False, cuda, mma_ok=True).kind == "mma"
    for n_, k_ in ((6144, 2048), (12288, 4096), (2048, 2048), (2048, 6100)):
        assert not _qgemm._mma_by_rule(4, n_, k_, "fp8", cuda)


def test_a_lora_forward_takes_the_mma_route_from_its_rows(monkeypatch) -> None:
    """dispatch asks the LoRA-epilogue questions with the mma route only from
    _qgemm.MMA_WITH_LORA_MIN_M rows; below, the fused kernel adds the delta in its store; the
    plain forward's questions always have the route."""
    from orbit.kernels import _qgemm, dispatch, int4_mma
    from orbit.kernels.random_weights import random_qweight

    if not int4_mma.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    x = torch.randn(4, 256).bfloat16()
    qw = random_qweight("nvfp4", 64, 256)
    assert dispatch.mma_operands_ok(x, qw)
    assert _qgemm.MMA_WITH_LORA_MIN_M == 5  # (measured: session 24)
    assert not dispatch._mma_ok_with_lora(x, qw)  # 4 rows: the fused kernel
    x8 = torch.randn(8, 256).bfloat16()
    assert dispatch._mma_ok_with_lora(x8, qw)  # 8 rows: the mma route, the delta apart
    monkeypatch.setattr(_qgemm, "MMA_WITH_LORA_MIN_M", 1)
    assert dispatch._mma_ok_with_lora(x, qw)
    monkeypatch.setattr(_qgemm, "MMA_WITH_LORA_MIN_M", 17)
    assert not dispatch._mma_ok_with_lora(x8, qw)


def test_operands_that_fit_the_mma_route() -> None:
    """dispatch.mma_operands_ok: symmetric INT4 with bf16 scales and bf16 x (groups 64 / 128),
    NVFP4 and FP8 with aligned code rows; not asymmetric INT4, GGUF-style groups of 32, fp16
    x, misaligned FP8 rows, or other formats."""
    from orbit.kernels import int4_mma
    from orbit.kernels.dispatch import mma_operands_ok
    from orbit.kernels.random_weights import random_qweight
    from orbit.quant.qweight import QuantizedWeight

    if not int4_mma.HAS_GLUON:
        pytest.skip("no Gluon in this Triton")
    x = torch.randn(4, 256).bfloat16()
    assert mma_operands_ok(x, random_qweight("int4", 64, 256, group_size=128))
    assert mma_operands_ok(x, random_qweight("int4", 64, 256, group_size=64))
    assert mma_operands_ok(x, random_qweight("nvfp4", 64, 256))
    assert not mma_operands_ok(x, random_qweight("int4", 64, 256, group_size=128, asym=True))
    assert not mma_operands_ok(x, random_qweight("int4", 64, 256, group_size=32))
    assert not mma_operands_ok(x.half(), random_qweight("int4", 64, 256, group_size=128))
    assert mma_operands_ok(x, random_qweight("fp8", 64, 256))
    assert not mma_operands_ok(x, random_qweight("mxfp4", 64, 256))
    wide = random_qweight("fp8", 64, 260).tensors
    off = QuantizedWeight("fp8", (64, 256), {"weight": wide["weight"][:, 1:257],  # rows off
                                             "scale_inv": wide["scale_inv"][:, :2]}, 128)
    assert not mma_operands_ok(x, off)  # 4-byte boundaries
    # past int4_mma's 32 rows INT4 and NVFP4 fit int4_wgmma (up to 256 rows, x rows TMA can
    # read); FP8 has no kernel there
    x33 = torch.randn(33, 256).bfloat16()
    assert mma_operands_ok(x33, random_qweight("int4", 64, 256, group_size=128))
    assert mma_operands_ok(x33, random_qweight("nvfp4", 64, 256))
    assert not mma_operands_ok(x33, random_qweight("fp8", 64, 256))
    assert not mma_operands_ok(torch.randn(257, 256).bfloat16(),
                               random_qweight("int4", 64, 256, group_size=128))
    assert not mma_operands_ok(torch.randn(33, 264).bfloat16()[:, 1:257],  # 2-byte offset
                               random_qweight("int4", 64, 256, group_size=128))


@pytest.mark.parametrize("vec", [4, 8, 16])
def test_loads_only_bench_kernel_reads_what_int4_mma_reads(vec: int) -> None:
    """scripts/bench/bench_mma_loads.py times int4_mma's word loads without the decode and
    MMA: its sm_90 compile must load only 16-byte vectors (int4_mma's loads), vec / 4 of them
    per weight row a thread holds per step, touch no shared memory and do one XOR per word."""
    tool = _tool()
    from bench_scripts import load_bench

    from orbit.kernels.int4_mma import layouts

    bench = load_bench("bench_mma_loads")
    lw = layouts(4, 1, 8, vec)[3]
    kernel = tool.compile_sm90(bench._loads_kernel, {"VEC": vec, "BN": 64, "DEPTH": 0, "LW": lw},
                               {"q_ptr": "*i32", "out_ptr": "*i32"}, 4, 1,
                               {"K_SLICE_W", "stride_q"})
    sass = tool.disassemble(kernel.asm["cubin"])
    loads = [ln for ln in sass.splitlines() if "LDG" in ln]
    assert loads and all("LDG.E.128" in ln for ln in loads), loads[:3]
    # a thread holds 2 rows of its warp's 16: (vec / 4) 16-byte loads each, per step; the
    # compiler may unroll the loop, so the count is a multiple
    assert len(loads) % (2 * vec // 4) == 0
    assert "LDS" not in sass and "STS" not in sass
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def test_pick_takes_two_chains_only_where_the_kernel_has_them(monkeypatch) -> None:
    from orbit.kernels import int4_mma

    monkeypatch.setattr(int4_mma, "MMA_CHAINS", 2)
    assert pick_config(4, 4096, 12288, 128, 132).chains == 2
    assert pick_config(4, 4096, 12288, 64, 132).chains == 1  # 8-byte steps: no even/odd words
    assert pick_config(4, 4096, 12288, 16, 132, "nvfp4").chains == 1  # its own knob
    assert pick_config(4, 4096, 12288, 128, 132, "fp8").chains == 1
    monkeypatch.setattr(int4_mma, "NVFP4_MMA_CHAINS", 2)
    assert pick_config(4, 4096, 12288, 16, 132, "nvfp4").chains == 2


def test_pick_stages_x_from_its_row_count_where_the_slice_fits(monkeypatch) -> None:
    from orbit.kernels import int4_mma

    assert not pick_config(16, 4096, 12288, 128, 132).x_smem  # (off until measured)
    monkeypatch.setattr(int4_mma, "X_SMEM_MIN_M", 9)
    assert pick_config(16, 4096, 12288, 128, 132).x_smem  # 16 x 1024 x 2 = 32 KB
    assert not pick_config(8, 4096, 12288, 128, 132).x_smem
    monkeypatch.setattr(int4_mma, "X_SMEM_MIN_M", 1)
    assert pick_config(1, 4096, 12288, 128, 132).x_smem
    # a slice past X_SMEM_MAX_BYTES keeps x in registers: 16 rows of 8192 / split 4 = 64 KB
    assert pick_config(16, 8192, 12288, 128, 132).split == 4
    assert not pick_config(16, 8192, 12288, 128, 132).x_smem
    # nor one whose depth is no power of two (Qwen3-1.7B's down_proj at 16 rows: 6144 / 8)
    assert pick_config(16, 6144, 2048, 128, 132).split == 8
    assert not pick_config(16, 6144, 2048, 128, 132).x_smem


def test_x_smem_refuses_a_slice_past_its_budget() -> None:
    pytest.importorskip("triton.experimental.gluon")
    from orbit.kernels.int4_mma import int4_mma
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 256, 4096, group_size=128)
    x = torch.randn(16, 4096).bfloat16()
    with pytest.raises(ValueError, match="X_SMEM_MAX_BYTES"):
        int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128,
                 MmaConfig(row_tiles=2, split=1, x_smem=True))


@pytest.mark.parametrize("bad", [MmaConfig(warps=1, kw=3), MmaConfig(warps=1, kw=4, tma=2),
                                 MmaConfig(warps=1, kw=8, split=8)])
def test_warps_along_k_refuses_what_the_kernel_does_not_run(bad: MmaConfig) -> None:
    """The launch names the problem before it allocates or launches anything: a kw outside
    KW_CHOICES, kw with another form, parts shallower than a step (4096 / 8 / 8 = 64)."""
    pytest.importorskip("triton.experimental.gluon")
    from orbit.kernels.int4_mma import int4_mma
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 256, 4096, group_size=128)
    x = torch.randn(4, 4096).bfloat16()
    with pytest.raises(ValueError, match="kw="):
        int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128, bad)


def _record_launches(monkeypatch, mod) -> dict:
    """Replace int4_mma's kernel with a recorder (Gluon has no interpreter): the returned dict
    gets the last launch's grid, positional args and keyword constants."""
    seen: dict = {}

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.update(grid=grid, args=args, kw=kw)
            return launch

    monkeypatch.setattr(mod, "_int4_mma_kernel", Recorder())
    return seen


@pytest.mark.parametrize("cfg", [MmaConfig(), MmaConfig(row_tiles=2, chains=2, x_prefetch=True),
                                 MmaConfig(split=2, x_smem=True),
                                 MmaConfig(warps=1, kw=4, row_tiles=2)])
def test_launch_passes_the_constants_the_offline_compile_uses(monkeypatch, cfg) -> None:
    """`int4_mma` hands the kernel `kernel_constants` (what sass_int4_mma.compile_mma compiles)
    plus PDL: the host side up to the launch, run on CPU with the kernel replaced by a
    recorder (Gluon has no interpreter)."""
    pytest.importorskip("triton.experimental.gluon")
    from orbit.kernels import int4_mma as mod
    from orbit.kernels.random_weights import random_qweight

    seen = _record_launches(monkeypatch, mod)
    qw = random_qweight("int4", 256, 512, group_size=128)
    m = 9 if cfg.row_tiles == 2 else 4
    x = torch.randn(m, 512).bfloat16()
    mod.int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128, cfg)
    want = mod.kernel_constants(cfg, m, 128, "int4", 256 % cfg.block_n == 0, 0,
                                512 // cfg.split // 128)
    kw = dict(seen["kw"])
    assert kw.pop("num_warps") == cfg.num_warps and kw.pop("PDL") is False
    assert kw == want
    assert seen["args"][-3] == 512 // cfg.split // cfg.kw // 8  # K_RUN_W: a warp's part, words
    assert seen["grid"] == (-(-256 // cfg.block_n), cfg.split)
    assert seen["args"][-1] is qw.tensors["qweight"]  # w_desc: the words again without TMA


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 4), ("int4", 128, 16), ("int4", 64, 4),
                                         ("nvfp4", 16, 4), ("fp8", 128, 4)])
def test_sm90_compile_warps_along_k_keep_the_register_forms_loop(fmt: str, group: int,
                                                                m: int) -> None:
    """MmaConfig.kw = 4 in place of the pick's split (warps = 1): each warp's K loop is the
    register form's, instruction for instruction where it counts: the same HMMA, decode and
    load counts, the x and word loads still 16-byte vectors (the warp's K part is added to x's
    pointers as a per-thread scalar, which keeps their contiguity), no shared memory or
    barrier in the loop, no spills; the parts meet once, in shared memory, after the loop."""
    pick = pick_config(m, 4096, 12288, group, 132, fmt)
    assert pick.split % 4 == 0
    tool, _, kernel, sass, plain, ops, plain_ops = _against_pick(
        fmt, group, m, warps=1, kw=4, split=pick.split // 4)
    for op in ("HMMA", "HFMA2", "HMUL2", "LDG"):
        assert ops[op] == plain_ops[op], op
    assert ops["PRMT"] <= plain_ops["PRMT"] + 1
    assert not ops["BAR"] and not ops["LDS"] and not ops["STS"]
    assert sass.count("LDG.E.128") == plain.count("LDG.E.128")
    assert "S2R" in sass and "SR_TID.X" in sass  # (the warp's K part)
    assert sass.count("BAR.SYNC") >= 1 and "STS" in sass  # (the parts' sum)
    assert kernel.metadata.num_warps == 4
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def test_pick_runs_warps_along_k_only_where_asked_and_it_fits(monkeypatch) -> None:
    import orbit.kernels.int4_mma as mod
    from orbit.kernels.int4_mma import kw_fits

    assert SHIPPED_WARP_K == 8  # (measured: docs/kernels.md "Warps along K")
    off = pick_config(4, 2048, 200, 128, 132)
    monkeypatch.setattr(mod, "WARP_K", 4)
    cfg = pick_config(4, 4096, 12288, 128, 132)
    assert (cfg.kw, cfg.warps, cfg.split, cfg.num_warps) == (4, 1, 1, 4)
    # the same 4 warps per tile and K slice as the split it replaces
    assert cfg.block_n * 4 == MmaConfig().block_n
    cfg16 = pick_config(16, 6144, 2048, 128, 132)
    assert (cfg16.kw, cfg16.split * cfg16.kw) == (4, 8)
    small = pick_config(4, 2048, 200, 128, 132)  # (the split's parts, wherever it is)
    assert small.kw * small.split == off.split and small.kw == min(4, off.split)
    monkeypatch.setattr(mod, "WARP_K", 1)
    assert not kw_fits(MmaConfig(warps=1, kw=3), 4096, 128)
    assert not kw_fits(MmaConfig(warps=1, kw=4, tma=2), 4096, 128)
    assert not kw_fits(MmaConfig(warps=1, kw=4, x_smem=True), 4096, 128)
    assert not kw_fits(MmaConfig(warps=1, kw=8, split=8), 4096, 128)  # 64-deep parts
    assert not kw_fits(MmaConfig(warps=1, kw=4, split=8), 4096, 256)  # parts off a group
    assert kw_fits(MmaConfig(warps=1, kw=4, split=4), 4096, 128)
    assert not kw_fits(MmaConfig(warps=1, kw=4, split=16), 4096, 128, "fp8")  # 64-deep parts


@pytest.mark.parametrize("fmt,group,m", [("int4", 128, 1), ("int4", 128, 16), ("int4", 128, 32),
                                         ("nvfp4", 16, 4), ("fp8", 128, 4)])
def test_sm90_compile_swiglu_store_keeps_the_k_loop(fmt: str, group: int, m: int) -> None:
    """The SwiGLU store (int4_mma's swiglu) changes the rows' addresses and the store only:
    the K loop is the plain form's instruction for instruction where it counts (HMMA, decode,
    the 16-byte loads), the pick's warps and no spills. (Its bits against the separate
    launches: tests/gpu/test_mma_swiglu_gpu.py.)"""
    tool = _tool()
    cfg = pick_config(m, 2048, 12288, group, 132, fmt)
    plain = tool.disassemble(tool.compile_mma(cfg, m, group, fmt=fmt, k=2048).asm["cubin"])
    kernel = tool.compile_mma(cfg, m, group, fmt=fmt, k=2048, swiglu=True)
    sass = tool.disassemble(kernel.asm["cubin"])
    ops, plain_ops = (tool.loop_budget(s, key="HMMA")[1] for s in (sass, plain))
    for op in ("HMMA", "LDG"):
        assert ops[op] == plain_ops[op], op
    assert sass.count("LDG.E.128") == plain.count("LDG.E.128")
    assert kernel.metadata.num_warps == cfg.num_warps
    assert "LOCAL:0" in tool.resources(kernel.asm["cubin"])


def test_swiglu_launch_passes_its_constants_and_refuses_what_it_cannot_pair(monkeypatch) -> None:
    """int4_mma(swiglu=True), host side up to the launch (the kernel replaced by a recorder):
    a [M, N / 2] output, the SWIGLU constants the offline compile uses; a split config or an
    odd N is refused before anything is launched."""
    pytest.importorskip("triton.experimental.gluon")
    from orbit.kernels import int4_mma as mod
    from orbit.kernels.random_weights import random_qweight

    seen = _record_launches(monkeypatch, mod)
    cfg = MmaConfig(warps=1, kw=4)
    qw = random_qweight("int4", 256, 512, group_size=128)
    x = torch.randn(4, 512).bfloat16()
    y = mod.int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128, cfg, swiglu=True)
    assert y.shape == (4, 128)
    kw = dict(seen["kw"])
    kw.pop("num_warps"), kw.pop("PDL")
    assert kw == mod.kernel_constants(cfg, 4, 128, "int4", True, 0, 512 // 128, swiglu=True)
    assert kw["SWIGLU"] is True and seen["grid"] == (256 // cfg.block_n, 1)
    assert mod.swiglu_fits(4, 512, 256, 128, 132) and not mod.swiglu_fits(4, 512, 255, 128, 132)
    seen.clear()
    with pytest.raises(ValueError, match="swiglu"):
        mod.int4_mma(x, qw.tensors["qweight"], qw.tensors["scale"], 128, MmaConfig(split=2),
                     swiglu=True)
    odd = random_qweight("int4", 255, 512, group_size=128)
    with pytest.raises(ValueError, match="swiglu"):
        mod.int4_mma(x, odd.tensors["qweight"], odd.tensors["scale"], 128, cfg, swiglu=True)
    assert not seen  # nothing launched


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int4", 64), ("nvfp4", 16),
                                       ("fp8", 128)])
@pytest.mark.parametrize("depth", [2, 3])
def test_sm90_compile_deep_prefetch_spills_nothing(monkeypatch, fmt: str, group: int,
                                                   depth: int) -> None:
    """The warps-along-K pick at M = 8 with two or three steps' words and scales held in
    registers ahead (MmaConfig.prefetch): no local memory (a spill would turn the prefetch
    into a round trip of its own), and the loop's MMA count is the one-step form's."""
    import dataclasses

    monkeypatch.setattr(int4_mma, "WARP_K", SHIPPED_WARP_K)
    tool = _tool()
    cfg = pick_config(8, 4096, 12288, group, 132, fmt)
    assert cfg.kw > 1
    one = tool.compile_mma(dataclasses.replace(cfg, prefetch=1), 8, group, fmt=fmt)
    deep = tool.compile_mma(dataclasses.replace(cfg, prefetch=depth), 8, group, fmt=fmt)
    assert "LOCAL:0" in tool.resources(deep.asm["cubin"])
    _, ops1, _ = tool.loop_budget(tool.disassemble(one.asm["cubin"]), key="HMMA")
    _, ops, _ = tool.loop_budget(tool.disassemble(deep.asm["cubin"]), key="HMMA")
    assert ops["HMMA"] == ops1["HMMA"]
