"""CPU checks of the LoRA delta added in the decode GEMV's store (orbit/kernels/lora_epilogue.py)
under Triton's interpreter: every GEMV kernel (nibble planes with and without the deferred
reduction, the dequantized-tile kernel, the FP8 kernel), with and without split-K, 1-3 members
whose column ranges straddle the kernel's tiles, ranks that are and are not powers of two, on
fresh random inputs into poisoned outputs, against the base GEMV followed by the unfused
expand-add; and the decode groups (orbit/adapters/lora_decode.py) of a tiny INT4 model, which
fold the expand-add into the base GEMV: same logits as the plain LoRA forward, the launch
counts, and the plain path wherever the fold must not run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from triton_interp import patch_interpreter, run_in_interpreter

triton = pytest.importorskip("triton")

# (fmt, random_qweight kwargs, K, member output widths, r, M, GemvConfig args or None = heuristic)
CASES = [
    ("int4", {"group_size": 32}, 256, [40, 24, 16], 8, 1, None),  # planes, deferred, 3 members
    ("int4", {"group_size": 32}, 256, [48, 16], 12, 1, (16, 64, 3, 4, 2)),  # split-K fix-up
    ("int4", {"group_size": 64, "asym": True, "offset_dtype": torch.float32}, 320, [80], 16, 3,
     (32, 128, 1, 4, 3, -1, True, False, True, False)),  # planes, per-step reduction, M = 3
    ("int4", {"group_size": 32}, 256, [24, 40], 4, 2, (32, 128, 2, 4, 3, -1, False)),  # tiles
    ("int8", {"group_size": 32}, 256, [64, 32, 32], 8, 4, (16, 64, 2, 4, 2)),  # tile kernel
    ("fp8", {}, 256, [128, 64], 16, 1, None),  # FP8 GEMV
    ("fp8", {}, 384, [96], 8, 1, "fp8-split"),  # FP8 GEMV, split-K
    ("nvfp4", {}, 256, [32, 16, 16], 8, 1, None),
    ("mxfp4", {}, 256, [56, 8], 8, 1, None),
    # the tl.dot loop (more rows than the GEMV takes; one member per launch)
    ("int4", {"group_size": 32}, 256, [80], 8, 6, "dot"),
    ("fp8", {}, 256, [64], 12, 20, "dot"),
    ("nvfp4", {}, 256, [48], 16, 17, "dot"),
    ("int4", {"group_size": 32}, 320, [40], 16, 100, "dot"),  # 2 shrink row blocks, 2 K chunks
]
# Cases (indices into CASES) rerun with A given: the launch computes h itself (shrink programs
# in the plane / FP8 GEMV's grid; a shrink launch first for the tile kernel and the dot loop).
SHRINK_CASES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
SCALE = 1.75


def _weights(fmt: str, kw: dict, n: int, k: int, seed: int):
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight(fmt, n, k, seed=seed, **kw)
    t = qw.tensors
    q, s = t.get("qweight", t.get("weight")), t.get("scale", t.get("scale_inv"))
    gs = t["global_scale"].reshape(1) if fmt == "nvfp4" else None
    group = {"nvfp4": 16, "mxfp4": 32, "fp8": 128}.get(fmt, qw.group_size)
    return qw, (q, s, t.get("offset"), gs, group)


def _poisoned(m: int, ns: list[int]) -> torch.Tensor:
    return torch.full((m, sum(ns)), float("nan")).bfloat16()


def _kernel_cases() -> dict:
    from orbit.kernels import _qgemm, gemv
    from orbit.kernels.gemv_fp8 import Fp8GemvConfig
    from orbit.kernels.lora_decode import lora_expand_add, lora_shrink
    from orbit.kernels.lora_epilogue import LoRAEpilogue, lora_epilogue_reference

    out: dict = {}
    for i, (fmt, kw, k, ns, r, m, c) in enumerate(CASES):
        g = torch.Generator().manual_seed(200 + i)
        qw, (q, s, off, gs, group) = _weights(fmt, kw, sum(ns), k, 300 + i)
        if c == "fp8-split":
            cfg = Fp8GemvConfig(block_n=32, block_k=128, split=3)
        elif c != "dot":
            cfg = gemv.GemvConfig(*c) if c else None
        x = torch.randn(m, k, generator=g).bfloat16()
        h = (torch.randn(m, len(ns) * r, generator=g) * 0.5).bfloat16()
        b = tuple((torch.randn(n, r, generator=g) * 0.5).bfloat16() for n in ns)
        lora = LoRAEpilogue(h, b, SCALE)
        args = (x, fmt, qw.shape, q, s, off, gs, group)
        if c == "dot":
            assert not _qgemm.use_gemv(m, sum(ns), k, fmt, x.device)
            base, y = (_qgemm.launch(*args, False, False, _poisoned(m, ns), lora=lo)
                       for lo in (None, lora))
        else:
            base, y = (gemv.gemv(*args, _poisoned(m, ns), cfg, lora=lo) for lo in (None, lora))
        ref = lora_epilogue_reference(base, lora)
        unfused = base.clone()
        lora_expand_add(h, list(b), list(torch.split(unfused, ns, dim=1)), SCALE)
        out[f"k{i}"] = {
            "nan": bool(y.isnan().any()),
            "err": ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item(),
            "same_as_expand_kernel": torch.equal(y, unfused),
            "delta": (y.double() - base.double()).abs().max().item()}
        if i in SHRINK_CASES:  # h from A inside the launch: the separate shrink's bits
            a = tuple((torch.randn(r, k, generator=g) * 0.2).bfloat16() for _ in ns)
            want = lora_shrink(x, list(a))
            ref_a = lora_epilogue_reference(base, LoRAEpilogue(want, b, SCALE))
            hb = torch.full((m, len(ns) * r), float("nan")).bfloat16()
            la = LoRAEpilogue(hb, b, SCALE, a)
            counters = torch.zeros(2, dtype=torch.int32)  # as the CUDA buffer: one for all
            gemv.lora_counters = lambda device, _c=counters: _c
            if c == "dot":
                ya = _qgemm.launch(*args, False, False, _poisoned(m, ns), lora=la)
            else:
                ya = gemv.gemv(*args, _poisoned(m, ns), cfg, lora=la)
            # twice: the launch must leave its h counters re-armed for the next one
            if c == "dot":
                yb = _qgemm.launch(*args, False, False, _poisoned(m, ns), lora=la)
            else:
                yb = gemv.gemv(*args, _poisoned(m, ns), cfg, lora=la)
            # the first 2 steps' weights preloaded (w_preload; shrink programs load nothing
            # that matters but must stay in bounds): the same bits
            yp = None
            if c != "dot":
                old, gemv.PDL_W_PRELOAD = gemv.PDL_W_PRELOAD, 2  # (the heuristic configs)
                cp = dataclasses.replace(cfg, w_preload=2) if cfg is not None else None
                yp = gemv.gemv(*args, _poisoned(m, ns), cp, lora=la)
                gemv.PDL_W_PRELOAD = old
            # the loop's shrink in the form the default threshold does not pick at m rows
            # (_qgemm.LOOP_SHRINK_DOT_MIN_M, a measured knob: one program per row of A, or
            # per row block with tensor-core dots): the same h up to an ulp
            hr = None
            if c == "dot" and m <= 64:
                row_form = triton.next_power_of_2(m) >= _qgemm.LOOP_SHRINK_DOT_MIN_M
                old, _qgemm.LOOP_SHRINK_DOT_MIN_M = (_qgemm.LOOP_SHRINK_DOT_MIN_M,
                                                     128 if row_form else 1)
                hr = torch.full((m, len(ns) * r), float("nan")).bfloat16()
                yr = _qgemm.launch(*args, False, False, _poisoned(m, ns),
                                   lora=LoRAEpilogue(hr, b, SCALE, a))
                _qgemm.LOOP_SHRINK_DOT_MIN_M = old
            h64 = x.double() @ torch.cat(a).double().T
            ulp = (want.float().abs() * 2.0 ** -7 * 1.01).double()
            out[f"s{i}"] = {"nan": bool(ya.isnan().any()), "h_equal": torch.equal(hb, want),
                            "h_ulp": bool(((hb.double() - want.double()).abs() <= ulp).all()),
                            "dot_rows": c == "dot" and m >= 8,
                            "h_err": ((want.double() - h64).abs().max() / h64.abs().max()).item(),
                            "y_equal": torch.equal(ya, ref_a), "again": torch.equal(ya, yb),
                            "counters": counters.tolist(),
                            "preload_equal": yp is None or torch.equal(yp, ya),
                            "row_roles": None if hr is None else {
                                "nan": bool(yr.isnan().any()),
                                "h_ulp": bool(((hr.double() - want.double()).abs()
                                               <= ulp).all()),
                                "y_err": ((yr.double() - ref_a.double()).abs().max()
                                          / ref_a.double().abs().max()).item()}}
    return out


def _model(fmt: str):
    from tiny_qwen3 import tiny_qwen3, with_active_lora

    from orbit.quant.convert import convert_linears
    from orbit.quant.siblings import fuse_siblings

    model = tiny_qwen3(seed=3).to(torch.bfloat16)
    convert_linears(model, fmt, group_size=32 if fmt == "int4" else None, cache_dequantized=False)
    fuse_siblings(model)
    return model, with_active_lora(model, torch.bfloat16)


def _model_checks() -> dict:
    """A tiny INT4 Qwen3 with LoRA on all linears, batch-1 forwards: folded vs plain logits and
    what launches each path makes."""
    import orbit.kernels.dispatch as dmod
    import orbit.kernels.lora_decode as kmod
    from orbit.adapters.lora_decode import link_lora_decode
    from orbit.models.attention import AttnBatch

    model, aset = _model("int4")
    rows = [1]  # tokens in the forward: 1 (a batch-1 decode step) or 6 (the tl.dot loop)

    def logits() -> torch.Tensor:
        n = rows[0]
        ids, pos = (torch.arange(n) * 7 + 11) % 97, torch.arange(n)
        return model.logits(model(ids, pos, AttnBatch.packed(torch.tensor([0, n]))))

    calls: dict[str, list] = {"shrink": [], "expand": [], "fold": [], "swiglu": []}
    wraps = [(kmod, "lora_shrink", "shrink"), (kmod, "lora_expand_add", "expand"),
             (dmod, "qmm_lora", "fold"), (dmod, "qmm_swiglu", "swiglu")]
    real = {name: getattr(mod, name) for mod, name, _ in wraps}
    for mod, name, key in wraps:
        def counted(*a, _f=real[name], _k=key, **kw):
            calls[_k].append(tuple(a[0].shape))
            return _f(*a, **kw)
        setattr(mod, name, counted)
    with torch.inference_mode():
        plain = logits()
        groups = link_lora_decode(model)
        folded = logits()
    n_infer = {k: len(v) for k, v in calls.items()}
    for v in calls.values():
        v.clear()
    with torch.no_grad():  # autograd off, not inference mode (a trainer pass): the plain
        nograd = logits()  # forward, as the base sibling groups stand aside there too
    n_nograd = {k: len(v) for k, v in calls.items()}
    for mod, name, _ in wraps:
        setattr(mod, name, real[name])

    def gemv_then_expand(x, qw, lora):  # the same base GEMV, then the separate expand-add
        if lora.a is not None:
            kmod.lora_shrink(x, list(lora.a), out=lora.h)
        y = dmod._kernel_for(qw)(x, qw)
        splits = [b.shape[0] for b in lora.b]
        kmod.lora_expand_add(lora.h, list(lora.b), list(torch.split(y, splits, 1)), lora.scale)
        return y

    dmod.qmm_lora, real_foldable = gemv_then_expand, dmod.swiglu_foldable
    dmod.swiglu_foldable = lambda *a, **kw: False  # gate/up too: GEMV, expand, SwiGLU kernel
    with torch.inference_mode():
        unfolded = logits()
    dmod.qmm_lora, dmod.swiglu_foldable = real["qmm_lora"], real_foldable
    # 6 rows: the quantized sibling groups stand aside, so each member folds into its own
    # tl.dot-loop launch (q, k, v, o, gate, up, down: 7 per layer), which computes its h
    rows[0] = 6
    for mod, name, key in wraps:
        def counted6(*a, _f=real[name], _k=key, **kw):
            calls[_k].append(tuple(a[0].shape))
            return _f(*a, **kw)
        setattr(mod, name, counted6)
    for v in calls.values():
        v.clear()
    with torch.inference_mode():
        folded6 = logits()
    n_rows6 = {k: len(v) for k, v in calls.items()}
    rows[0] = 100  # past the expand kernel's 64 rows: only the fold serves (a prefill chunk)
    for v in calls.values():
        v.clear()
    with torch.inference_mode():
        folded100 = logits()
    n_rows100 = {k: len(v) for k, v in calls.items()}
    # 100 rows where the bases dequantize and run cuBLAS (a rollout batch with the measured
    # INT4 threshold): no fold; per group the base launches, one shrink, one expand-add
    from orbit.kernels import _qgemm

    table, _qgemm.DEQUANT_MIN_M_BY_FMT = _qgemm.DEQUANT_MIN_M_BY_FMT, {"int4": 64}
    for v in calls.values():
        v.clear()
    with torch.inference_mode():
        grouped100 = logits()
    n_grouped100 = {k: len(v) for k, v in calls.items()}
    _qgemm.DEQUANT_MIN_M_BY_FMT = table
    rows[0] = 6
    for mod, name, _ in wraps:
        setattr(mod, name, real[name])
    from orbit.adapters.lora_decode import unlink_lora_decode

    unlink_lora_decode(model)
    with torch.inference_mode():
        plain6 = logits()
        rows[0] = 100
        plain100 = logits()
    rows[0] = 1
    with aset.adapter_disabled(), torch.inference_mode():
        base = logits()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    return {"groups": groups, "infer": n_infer, "nograd": n_nograd, "err": rel(folded, plain),
            "rows6": n_rows6, "err6": rel(folded6, plain6),
            "rows100": n_rows100, "err100": rel(folded100, plain100),
            "grouped100": n_grouped100, "err_grouped100": rel(grouped100, plain100),
            "same_as_unfolded": torch.equal(folded, unfolded),
            "err_nograd": rel(nograd, plain), "adapter_effect": rel(plain, base)}


def _engine_checks() -> dict:
    """The rollout engine (CPU, kernels under the interpreter) on the tiny INT4 model with LoRA:
    greedy completions with the folded groups against the plain LoRA forward, at batch 1 (the
    decode GEMVs, h in their grid) and batch 3 (a 70-token prompt: prefill beyond the expand
    kernel's 64 rows, only the fold serves it)."""
    from tiny_qwen3 import tiny_qwen3, with_active_lora

    import orbit.kernels.dispatch as dmod
    from orbit.adapters.lora_decode import unlink_lora_decode
    from orbit.quant.convert import convert_linears
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    model = tiny_qwen3(lm_scale=8.0, seed=5).to(torch.bfloat16)
    convert_linears(model, "int4", group_size=32, cache_dequantized=False)
    with_active_lora(model, torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(6, 97, (n,), generator=g).tolist() for n in (9, 70, 5)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True,
                        logprobs_mode="scaled")
    rows = []
    real, real_on_gpu = dmod.qmm_lora, dmod._on_gpu
    dmod.qmm_lora = lambda *a, **kw: rows.append(a[0].shape[0]) or real(*a, **kw)
    # every quantized matmul through the Triton kernels (as on CUDA), so both runs share the
    # base arithmetic and differ only in how the adapter is added
    dmod._on_gpu = lambda x: x.dtype in (torch.bfloat16, torch.float16)
    out: dict = {}
    for batch in (1, 3):
        runs = []
        for fuse in (False, True):
            unlink_lora_decode(model)
            n0 = len(rows)
            eng = Engine(model, max_num_seqs=batch, max_model_len=96, fuse_lora=fuse,
                         fuse_siblings=True)
            comps = [c for r in eng.generate(prompts[:batch], sp) for c in r]
            runs.append((comps, sorted(set(rows[n0:]))))
        (plain, _), (fused, fold_rows) = runs
        out[f"b{batch}"] = {
            "tokens_equal": [p.tokens == f.tokens for p, f in zip(plain, fused)],
            "max_dlogp": max(abs(a - b) for p, f in zip(plain, fused)
                             for a, b in zip(p.logprobs, f.logprobs)),
            "fold_rows": fold_rows}
    dmod.qmm_lora, dmod._on_gpu = real, real_on_gpu
    return out


def _interpreter_main() -> None:
    from orbit.kernels import _qgemm

    patch_interpreter(bf16_dot=True, bf16_round=True)
    # The fused tl.dot loop and its epilogue up to 1023 rows, as for the formats without a
    # measured threshold (_qgemm.DEQUANT_MIN_M_BY_FMT moves INT4 to dequantize + cuBLAS from
    # 64 rows: the 100-row cases below test the loop and the fold, not that choice).
    _qgemm.DEQUANT_MIN_M_BY_FMT = {}
    out = _kernel_cases()
    out["model"] = _model_checks()
    out["engine"] = _engine_checks()
    print(json.dumps(out))


@pytest.fixture(scope="module")
def interp() -> dict:
    return run_in_interpreter(__file__)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_epilogue_matches_the_unfused_expand_add(interp: dict, case: int) -> None:
    r = interp[f"k{case}"]
    assert not r["nan"]  # every output element written
    assert r["delta"] > 0  # the delta landed
    # torch's expand sums in another order: at most an ulp of y (bf16)
    assert r["err"] < 1e-2, r
    # the expand kernel's products and sum over r: the same bits under the interpreter
    assert r["same_as_expand_kernel"], r


@pytest.mark.parametrize("case", SHRINK_CASES)
def test_launch_computes_h_itself(interp: dict, case: int) -> None:
    r = interp[f"s{case}"]
    assert not r["nan"]
    if r["dot_rows"]:  # one accumulation over K where the separate shrink adds K chunks
        assert r["h_ulp"], r
    else:  # the separate shrink's code for a row of A: the same h, the same outputs
        assert r["h_equal"] and r["y_equal"], r
    assert r["h_err"] < 1e-2, r  # and that h is x A^T (one bf16 rounding)
    assert r["again"] and r["counters"] == [0, 0], r  # counters re-armed for the next launch
    assert r["preload_equal"], r  # GemvConfig / Fp8GemvConfig.w_preload = 2: the same bits
    if r["row_roles"] is not None:  # the loop's shrink as row-of-A programs (a knob)
        rr = r["row_roles"]
        assert not rr["nan"] and rr["h_ulp"] and rr["y_err"] < 1e-2, rr


def test_groups_fold_in_a_quantized_model(interp: dict) -> None:
    r = interp["model"]
    assert r["groups"] == 2 * 4  # per layer: q/k/v, o, gate/up, down
    # inference mode, batch 1: per group one base GEMV that computes h in its own grid and
    # adds the delta in its store (gate/up's also stores SwiGLU): no shrink or expand launch
    assert r["infer"] == {"shrink": 0, "expand": 0, "fold": 6, "swiglu": 2}, r
    # no_grad without inference mode (a trainer pass): no group serves
    assert r["nograd"] == {"shrink": 0, "expand": 0, "fold": 0, "swiglu": 0}, r
    assert r["adapter_effect"] > 1e-2
    # plain = reference matmuls of bf16 weights; folded = the GEMV's fp32 sums of the exact
    # weights: bf16-level differences only
    assert r["err"] < 2e-2 and r["err_nograd"] < 2e-2, r
    # the same base GEMV followed by the expand-add kernel: the same logits, bit for bit
    assert r["same_as_unfolded"], r
    # 6 rows: per-member tl.dot-loop launches that compute their h and add the delta
    assert r["rows6"] == {"shrink": 0, "expand": 0, "fold": 2 * 7, "swiglu": 0}, r
    assert r["err6"] < 2e-2, r
    # 100 rows (beyond the expand kernel): the same, h in row blocks of 64
    assert r["rows100"] == {"shrink": 0, "expand": 0, "fold": 2 * 7, "swiglu": 0}, r
    assert r["err100"] < 2e-2, r
    # 100 rows on dequantize + cuBLAS bases: the group's shrink and expand-add launches (row
    # blocks of 64) instead of four plain launches per linear
    assert r["grouped100"] == {"shrink": 2 * 4, "expand": 2 * 4, "fold": 0, "swiglu": 0}, r
    assert r["err_grouped100"] < 2e-2, r


def test_engine_generates_with_the_fold(interp: dict) -> None:
    r = interp["engine"]
    assert 1 in r["b1"]["fold_rows"], r  # batch-1 decode steps folded
    assert max(r["b3"]["fold_rows"]) >= 70, r  # the 70-token prefill folded as well
    for b in ("b1", "b3"):  # greedy on a sharp head: the same tokens, close log-probs
        assert all(r[b]["tokens_equal"]), r
        assert r[b]["max_dlogp"] < 1e-2, r  # (0.0 under the interpreter here)


def test_epilogue_errors_name_the_problem() -> None:
    from orbit.kernels.lora_epilogue import LoRAEpilogue

    y = torch.zeros(2, 48, dtype=torch.bfloat16)
    h = torch.zeros(2, 16, dtype=torch.bfloat16)
    b = (torch.zeros(32, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16))
    LoRAEpilogue(h, b, 1.0).check(y)
    with pytest.raises(ValueError, match="48 columns"):
        LoRAEpilogue(h, b[:1], 1.0).check(y)
    with pytest.raises(ValueError, match=r"h must be \[2, 16\]"):
        LoRAEpilogue(h[:, :8], b, 1.0).check(y)
    with pytest.raises(ValueError, match=r"B\[1\] must be contiguous"):
        LoRAEpilogue(h, (b[0], b[1].float()), 1.0).check(y)


def test_launch_refuses_an_epilogue_outside_the_decode_gemv() -> None:
    from orbit.kernels._qgemm import launch
    from orbit.kernels.lora_epilogue import LoRAEpilogue
    from orbit.kernels.random_weights import random_qweight

    qw = random_qweight("int4", 32, 64, seed=1, group_size=32)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    lora = LoRAEpilogue(torch.zeros(1, 8, dtype=torch.bfloat16),
                        (torch.zeros(32, 8, dtype=torch.bfloat16),), 1.0)
    t = qw.tensors
    with pytest.raises(ValueError, match="exact=True"):
        launch(x, "int4", qw.shape, t["qweight"], t["scale"], None, None, 32, False, True,
               lora=lora)


if __name__ == "__main__":
    _interpreter_main()
