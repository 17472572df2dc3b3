"""CPU checks of the persistent MLP launch (orbit/kernels/gemv_chain.py) under Triton's
interpreter, where it runs as its two phases (PHASE 1, PHASE 2; the grid barrier needs a GPU):
on fresh random inputs, for the nibble-plane formats, with and without split-K in either phase,
tail tiles, several rows and fewer programs than work items, its output equals the separate
`gemv(swiglu=True)` + `gemv` launches with the same configs bit for bit and a float64
reference to BF16 rounding; and a tiny INT4 model's decode MLP takes the chain with the logits
of the separate launches."""

from __future__ import annotations

import pytest
import torch
from triton_interp import print_kernel_and_model_results, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, hidden, I, M, gate/up GemvConfig args, down GemvConfig args,
# programs (0: one per work item))
CASES = [
    ("int4", {"group_size": 32}, 256, 96, 1, None, None, 0),  # the heuristic configs
    ("int4", {"group_size": 32}, 256, 96, 1, (32, 64, 2, 4, 2), (32, 64, 3, 4, 2), 5),
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 192, 128, 3,
     (16, 64, 1, 4, 3, -1, True, False, True, False), (16, 128, 2, 4, 3, -1, True, False,
                                                       True, False), 0),
    ("nvfp4", {}, 128, 80, 1, None, None, 3),  # (and in the separate launches' grid order)
    ("mxfp4", {}, 128, 64, 2, (16, 64, 2, 4, 2), (16, 64, 1, 4, 2), 0),
]


def _kernel_cases() -> dict:
    from orbit.kernels import gemv
    from orbit.kernels.gemv_chain import ChainConfig, mlp_chain, separate_mlp
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.random_weights import random_qweight

    out: dict = {}
    out_plain: dict = {}
    for i, (fmt, kw, hid, inter, m, c1, c2, progs) in enumerate(CASES):
        g = torch.Generator().manual_seed(70 + i)
        gu = random_qweight(fmt, 2 * inter, hid, seed=80 + i, **kw)
        dn = random_qweight(fmt, hid, inter, seed=90 + i, **kw)
        x = torch.randn(m, hid, generator=g).bfloat16()
        cfgs = ((gemv.GemvConfig(*c1), gemv.GemvConfig(*c2)) if c1 else
                (gemv.pick_gemv_config(m, 2 * inter, hid, fmt), gemv.pick_gemv_config(
                    m, hid, inter, fmt)))
        want = separate_mlp(x, gu, dn, cfgs)
        got = mlp_chain(x, gu, dn, ChainConfig(programs=progs, grid_order=i == 3),
                        gemv_configs=cfgs)
        out_plain[i] = got
        # the first items' first K steps loaded before the (PDL) wait: the same bits
        pre = mlp_chain(x, gu, dn, ChainConfig(programs=progs, grid_order=i == 3, w_preload=2,
                                               preload_down=1), gemv_configs=cfgs)
        wg, wu = gu.dequantize(torch.float64).split(inter)
        x64 = x.double()
        ref = (torch.nn.functional.silu(x64 @ wg.T) * (x64 @ wu.T)) @ dn.dequantize(
            torch.float64).T
        out[str(i)] = {"nan": bool(got.isnan().any()), "equal": torch.equal(got, want),
                       "preload_equal": torch.equal(pre, want),
                       "err": ((got.double() - ref).norm() / ref.norm()).item(),
                       "splits": [c.split for c in cfgs]}
        # with LoRA on both GEMVs (h computed in the launch, as the separate launches do)
        r = 8
        a = [(torch.randn(r, k, generator=g) * 0.2).bfloat16() for k in (hid, hid, inter)]
        b = [(torch.randn(n, r, generator=g) * 0.5).bfloat16() for n in (inter, inter, hid)]

        def epis(m=m, a=a, b=b, r=r):
            return (LoRAEpilogue(torch.full((m, 2 * r), float("nan")).bfloat16(),
                                 (b[0], b[1]), 1.5, (a[0], a[1])),
                    LoRAEpilogue(torch.full((m, r), float("nan")).bfloat16(), (b[2],), 1.5,
                                 (a[2],)))

        want = separate_mlp(x, gu, dn, cfgs, lora=epis())
        got = mlp_chain(x, gu, dn, ChainConfig(programs=progs, grid_order=i == 3), cfgs,
                        lora=epis())
        out[f"{i}-lora"] = {"nan": bool(got.isnan().any()), "equal": torch.equal(got, want),
                            "moved": not torch.equal(got, out_plain[i])}
    return out


def _model_checks() -> dict:
    """A tiny INT4 Qwen3 (siblings stacked), batch-1 forward in inference mode with
    AttnBatch.chain_mlp: each layer's MLP is one chain launch, with the logits of the
    separate launches; the same with a LoRA adapter active on every linear (decode groups
    linked, gemv_chain.CHAIN_LORA on), against the separate launches with the deltas in
    their stores."""
    from tiny_qwen3 import tiny_int4_decoder

    import orbit.kernels.dispatch as dmod
    import orbit.kernels.gemv_chain as chain
    from orbit.models.attention import AttnBatch

    real_on_gpu, real_chain, real_lora = dmod._on_gpu, chain.mlp_chain, chain.CHAIN_LORA
    dmod._on_gpu = lambda x: x.dtype in (torch.bfloat16, torch.float16)
    chain.CHAIN_LORA = True
    calls: list[bool] = []
    chain.mlp_chain = lambda *a, **kw: calls.append(kw.get("lora") is not None) or real_chain(
        *a, **kw)
    out = {}
    for adapter in (False, True):
        model = tiny_int4_decoder(adapter)
        ids, pos = torch.tensor([17]), torch.tensor([0])
        calls.clear()
        with torch.inference_mode():
            res = {}
            for on in (True, False):
                attn = AttnBatch.packed(torch.tensor([0, 1]))
                attn.chain_mlp = on
                res[on] = model.logits(model(ids, pos, attn))
        out["lora" if adapter else "base"] = {"calls": len(calls), "with_lora": sum(calls),
                                              "equal": torch.equal(res[True], res[False])}
    chain.mlp_chain, dmod._on_gpu, chain.CHAIN_LORA = real_chain, real_on_gpu, real_lora
    return out


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_chain_equals_separate_launches(interp: dict, case: int) -> None:
    r = interp[str(case)]
    assert not r["nan"], r  # every output element written
    assert r["equal"], r  # the same programs, tiles and K order as the two separate GEMVs
    assert r["preload_equal"], r  # ChainConfig.w_preload: the first steps peeled, same sums
    # and the MLP itself: bf16 gate/up, SwiGLU and output roundings (0.3-0.4% in norm here;
    # patch_interpreter makes the casts round as the GPU does)
    assert r["err"] < 1e-2, r


@pytest.mark.parametrize("case", range(len(CASES)))
def test_chain_with_lora_equals_separate_launches(interp: dict, case: int) -> None:
    r = interp[f"{case}-lora"]
    assert not r["nan"], r
    assert r["equal"], r  # the shrink rows and the deltas of gemv(..., lora=) in each store
    assert r["moved"], r  # (and the adapters did change the output)


def test_cases_cover_split_k_in_both_phases(interp: dict) -> None:
    splits = [interp[str(i)]["splits"] for i in range(len(CASES))]
    assert any(s[0] > 1 for s in splits) and any(s[1] > 1 for s in splits), splits


@pytest.mark.parametrize("key", ["base", "lora"])
def test_model_decode_mlp_takes_the_chain(interp: dict, key: str) -> None:
    r = interp["model"][key]
    assert r["calls"] == 2, r  # one chain launch per layer (2 layers)
    assert r["with_lora"] == (2 if key == "lora" else 0), r
    assert r["equal"], r


def test_chain_refuses_mismatched_operands() -> None:
    from orbit.kernels.gemv_chain import mlp_chain
    from orbit.kernels.random_weights import random_qweight

    gu = random_qweight("int4", 128, 64, seed=1, group_size=32)
    dn = random_qweight("nvfp4", 64, 64, seed=2)
    with pytest.raises(ValueError, match="not a pair of plane-GEMV decode forwards"):
        mlp_chain(torch.zeros(1, 64, dtype=torch.bfloat16), gu, dn)


def test_programs_per_sm_follows_registers_and_shared_memory() -> None:
    from orbit.kernels.grid_barrier import SmLimits, programs_per_sm

    lim = SmLimits(sms=132)
    assert programs_per_sm(136, 0, 4, lim) == 3  # 136 regs x 128 threads: 3 of 65536
    assert programs_per_sm(64, 0, 4, lim) == 8
    assert programs_per_sm(32, 100_000, 4, lim) == 2  # shared memory binds
    assert programs_per_sm(16, 0, 1, lim) == 32  # the per-SM block limit


if __name__ == "__main__":
    print_kernel_and_model_results(_kernel_cases, _model_checks)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("dataflow", [False, True])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_persistent_kernel_compiles_for_sm90(fmt: str, dataflow: bool, lora: bool) -> None:
    """PHASE 0 (the grid barrier or the per-slice counters, PDL, both prefetches; the dataflow
    form without LoRA also with w_preload and PDL = 2) compiles for sm_90 with Triton's own ptxas, on a machine without a GPU: the interpreter never traces
    the spin loops."""
    from pathlib import Path

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from orbit.kernels._qgemm import FMT_IDS
    from orbit.kernels.gemv_chain import _mlp_chain_kernel

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas")
    consts = {"FMT": FMT_IDS[fmt], "CODE": 0 if fmt == "int4" else 4,
              "GROUP": 128 if fmt == "int4" else 16, "HAS_OFFSET": False, "MP": 1, "STAGES": 3,
              "ASM": True, "BN1": 32, "NG1": 4 if fmt == "int4" else 16, "FIX1": False,
              "DEFER1": True, "XPRE1": True, "BN2": 32, "NG2": 4 if fmt == "int4" else 16,
              "FIX2": True, "DEFER2": True, "XPRE2": True, "PHASE": 0, "PREFETCH": 2,
              "PDL": 2 if dataflow and not lora else True, "SPIN": 1 << 24, "SLEEP": 100, "DATAFLOW": dataflow,
              "LORA1": 2 if lora else 0, "LRP1": 16, "SBK1": 256, "LORA2": 1 if lora else 0,
              "LRP2": 16, "SBK2": 256, "WPRE": 2 if dataflow and not lora else 0,
              "WPRE_B": 1 if dataflow and not lora else 0}
    ptrs = {"x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "cnt_ptr": "*i32",
            "bar_ptr": "*i32", "out1": "*bf16", "out2": "*fp32", "q1": "*i32", "q2": "*i32",
            "s1": "*bf16" if fmt == "int4" else "*fp8e4nv",
            "s2": "*bf16" if fmt == "int4" else "*fp8e4nv", "o1": "*bf16", "o2": "*bf16",
            "g1": "*fp32", "g2": "*fp32", "hc1": "*i32", "hc2": "*i32", "lscale1": "fp32",
            "lscale2": "fp32"}
    for i in "12":  # the LoRA epilogues' h, A and B
        ptrs.update({f"{t}{i}": "*bf16" for t in ("lh", "a0", "a1", "a2", "b0", "b1", "b2")})
    fn = _mlp_chain_kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
    ptx = k.asm["ptx"]
    assert "griddepcontrol.wait" in ptx and "cp.async.bulk.prefetch.L2" in ptx
    # ChainConfig.w_preload: the first items' weights are loaded before the wait; PDL = 2
    # (pdl.EARLY_RELEASE): the next kernel is released before it
    before = ptx[:ptx.index("griddepcontrol.wait")]
    assert ("ld.global" in before) == (dataflow and not lora)
    assert ("griddepcontrol.launch_dependents" in before) == (dataflow and not lora)
    assert ptx.count("griddepcontrol.launch_dependents") == 1
    assert ("nanosleep.u32" in ptx) != dataflow  # (the barrier's back-off)
    # the barrier: generation read with acquire, arrival acq_rel, release bump by the last
    assert "ld.global.gpu.acquire" in ptx and "atom.global.gpu.acq_rel.add" in ptx
    # (dataflow: the producers' release increments, the readers' re-arm)
    assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx


@pytest.mark.parametrize("unsplit", [True, False])
@pytest.mark.parametrize("hid,inter,split_ok", [(2048, 6144, True), (2560, 9728, True),
                                                (576, 1536, False)])
def test_engine_takes_only_the_dataflow_form(hid: int, inter: int, split_ok: bool,
                                             unsplit: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's rule (mlp_chain_fits) asks for the dataflow form, which needs an unsplit
    gate/up GEMV: every INT4 MLP at batch 1 has one with the unsplit M = 1 tiles
    (gemv.PLANES_M1_UNSPLIT, the default); under the split rule the Qwen3 MLPs have one and
    SmolLM2's (96 column tiles, split 2) not."""
    from orbit.kernels import gemv
    from orbit.kernels.gemv import pick_gemv_config
    from orbit.kernels.gemv_chain import _dataflow_ok

    monkeypatch.setattr(gemv, "PLANES_M1_UNSPLIT", unsplit)
    ok = split_ok or unsplit
    c1 = pick_gemv_config(1, 2 * inter, hid, "int4", 132)
    c2 = pick_gemv_config(1, hid, inter, "int4", 132)
    assert _dataflow_ok(c1, c2, hid, inter, 32 if hid % 128 else 128) == ok
