"""Sibling QuantLinears (q/k/v, gate/up) stacked into one buffer per name and run as one launch
(orbit.quant.siblings): no weight held twice, same outputs as separate launches, fewer qmm
calls, and every case the grouped path must not serve (autograd, exact mode, OFT's per-layer
inputs, moved buffers, unequal NVFP4 global scales) falls back to the separate launches."""

from __future__ import annotations

import pytest
import torch
from tiny_qwen3 import VOCAB as V
from tiny_qwen3 import tiny_qwen3

from orbit.adapters import AdapterConfig, inject_adapters
from orbit.kernels import dispatch
from orbit.models.transformer import CausalLM
from orbit.quant.convert import convert_linears
from orbit.quant.linear import SIBLING_MAX_M, QuantLinear, sibling_serves
from orbit.quant.siblings import fuse_siblings
from orbit.rollout.engine import Engine
from orbit.rollout.types import SamplingParams


def _model(fmt: str = "int4", seed: int = 0) -> CausalLM:
    m = tiny_qwen3(lm_scale=8.0, seed=seed)
    # cache_dequantized=False: the kernel path (the CPU reference of qmm), which is the path
    # the grouped launch replaces; the dense-weight cache path is never grouped.
    convert_linears(m, fmt, group_size=32 if fmt in ("int4", "int8") else None, cache_dequantized=False)
    return m


def _count_qmm(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    orig = dispatch.qmm

    def counting(x, qw, *a, **kw):
        calls.append(qw.shape[0])
        return orig(x, qw, *a, **kw)

    monkeypatch.setattr(dispatch, "qmm", counting)
    return calls


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(6, V, (n,), generator=g).tolist() for n in (5, 1, 9)]


def _bytes(m: torch.nn.Module) -> int:
    seen = {}
    for b in m.buffers():
        seen[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("fmt", ["int4", "int8", "mxfp4", "bf16"])
def test_fuse_stacks_views_without_copies(fmt: str) -> None:
    m = _model(fmt)
    before = _bytes(m)
    ref = {n: b.clone() for n, b in m.named_buffers()}
    assert fuse_siblings(m) == 2 * 2  # (q/k/v, gate/up) x 2 layers
    assert fuse_siblings(m) == 0  # already linked
    attn = m.model.layers[0].self_attn
    q, v = attn.q_proj, attn.v_proj
    name = q._tensor_names[0]
    assert getattr(q, name).untyped_storage().data_ptr() == getattr(v, name).untyped_storage().data_ptr()
    assert _bytes(m) == before  # the old buffers are gone, nothing held twice
    for n, b in m.named_buffers():  # every layer still holds its own weight, bit for bit
        assert torch.equal(b, ref[n]), n


def test_fused_generate_matches_separate_and_launches_fewer(monkeypatch: pytest.MonkeyPatch) -> None:
    sp = SamplingParams(temperature=0.8, max_new_tokens=6, ignore_eos=True, seed=4)
    calls = _count_qmm(monkeypatch)
    plain = Engine(_model(), max_num_seqs=3, max_model_len=32, fuse_siblings=False)
    a = plain.generate(_prompts(), sp)
    n_plain = len(calls)
    calls.clear()
    fused = Engine(_model(), max_num_seqs=3, max_model_len=32, fuse_siblings=True)
    assert fused.sibling_groups == 4
    b = fused.generate(_prompts(), sp)
    n_fused = len(calls)
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra, rb):
            assert ca.tokens == cb.tokens
            assert torch.allclose(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5)
    # Decode steps (3 rows <= SIBLING_MAX_M): 7 launches per layer -> 4; prefill stays at 7.
    st = fused.last_stats
    assert n_plain == 7 * 2 * (st["prefill_steps"] + st["decode_steps"])
    assert n_fused == n_plain - 3 * 2 * st["decode_steps"]
    assert 64 + 2 * 32 in calls  # q/k/v stacked: 64 + 32 + 32 rows


def test_quantized_groups_serve_decode_and_dequantize_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quantized groups serve decode rows (<= SIBLING_MAX_M) and, with SIBLING_FROM_DEQUANT,
    the rows where fast mode dequantizes + runs cuBLAS (one pass and one GEMM over the stacked
    rows); in between (the tl.dot loop's rows) each member runs its own launch."""
    import orbit.quant.linear as qlinear
    from orbit.kernels import _qgemm

    assert sibling_serves("int4", SIBLING_MAX_M) and not sibling_serves("int4", SIBLING_MAX_M + 1)
    lo = _qgemm.dequant_min_m("int4")
    assert sibling_serves("int4", lo) and not sibling_serves("int4", lo - 1)
    assert sibling_serves("nvfp4", _qgemm.dequant_min_m("nvfp4"))
    monkeypatch.setattr(_qgemm, "DEQUANT_MIN_M_BY_FMT", {"int4": 8})  # small rows for the CPU
    m = _model()
    fuse_siblings(m)
    attn = m.model.layers[0].self_attn
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    calls = _count_qmm(monkeypatch)
    with torch.inference_mode():
        for rows, want in [(8, [128]), (12, [128]), (6, [64, 32, 32]), (3, [128])]:
            xs = torch.randn(rows, 64)
            calls.clear()
            grouped = [lin(xs) for lin in lins]
            assert calls == want, (rows, calls)
            monkeypatch.setattr(qlinear, "SIBLING_FROM_DEQUANT", False)
            calls.clear()
            xc = xs.clone()  # (a new tensor: no cached group output)
            alone = [lin(xc) for lin in lins]
            monkeypatch.setattr(qlinear, "SIBLING_FROM_DEQUANT", True)
            assert calls == ([128] if rows <= SIBLING_MAX_M else [64, 32, 32]), (rows, calls)
            for g, a in zip(grouped, alone):
                assert torch.allclose(g, a, atol=1e-5)
    assert attn.q_proj._sibling.enabled


def test_bf16_groups_serve_every_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """BF16 groups are one cuBLAS GEMM over stacked rows at any M (decode of more than
    SIBLING_MAX_M sequences, prefill)."""
    assert sibling_serves("bf16", 1 << 20)
    g = torch.Generator().manual_seed(4)
    ps = [torch.randint(6, V, (n,), generator=g).tolist() for n in (5, 1, 9, 3, 7, 2)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True)
    calls = _count_qmm(monkeypatch)
    a = Engine(_model("bf16"), max_num_seqs=6, max_model_len=32, fuse_siblings=False).generate(ps, sp)
    n_plain = len(calls)
    calls.clear()
    fused = Engine(_model("bf16"), max_num_seqs=6, max_model_len=32, fuse_siblings=True)
    b = fused.generate(ps, sp)
    st = fused.last_stats
    assert st["decode_tokens"] > SIBLING_MAX_M * st["decode_steps"] - st["decode_steps"]  # wide steps
    # every step, prefill included, runs 4 launches per layer instead of 7
    assert len(calls) == n_plain - 3 * 2 * (st["prefill_steps"] + st["decode_steps"])
    for ra, rb in zip(a, b):
        assert ra[0].tokens == rb[0].tokens
        assert torch.allclose(torch.tensor(ra[0].logprobs), torch.tensor(rb[0].logprobs), atol=1e-4)


def test_lora_wrapped_members_still_group(monkeypatch: pytest.MonkeyPatch) -> None:
    m_plain, m_fused = _model(), _model()
    for m in (m_plain, m_fused):
        torch.manual_seed(9)  # the same A init and B in both
        aset = inject_adapters(m, AdapterConfig(kind="lora", r=4, alpha=8, dtype=torch.float32))
        with torch.no_grad():
            for mod in aset.modules.values():
                mod.slot_tensor(0, "lora_B").normal_()  # a non-zero delta
        aset.set_active(0)
    fuse_siblings(m_fused)
    calls = _count_qmm(monkeypatch)
    x = torch.randn(3, 64)
    with torch.inference_mode():  # the engine's mode: the only one that groups
        ya = m_plain.model.layers[1].mlp(x)
        n_plain = len(calls)
        yb = m_fused.model.layers[1].mlp(x)
    assert n_plain == 3 and len(calls) - n_plain == 2
    assert torch.allclose(ya, yb, atol=1e-5)


def test_oft_inputs_turn_the_group_off(monkeypatch: pytest.MonkeyPatch) -> None:
    m_plain, m_fused = _model(), _model()
    for m in (m_plain, m_fused):
        torch.manual_seed(9)
        aset = inject_adapters(m, AdapterConfig(kind="oft", block_size=16, dtype=torch.float32))
        aset.set_active(0)
    fuse_siblings(m_fused)
    mlp_a, mlp_b = m_plain.model.layers[0].mlp, m_fused.model.layers[0].mlp
    with torch.no_grad():
        for mod in (mlp_a, mlp_b):  # a non-identity rotation: each projection sees its own input
            for lin in (mod.gate_proj, mod.up_proj):
                torch.manual_seed(5)
                for t in lin.slot_tensors(0).values():
                    t.normal_(std=0.1)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        ya = mlp_a(x)
        yb = mlp_b(x)  # the group sees up_proj called with another input and stands aside
        group = mlp_b.gate_proj.base._sibling
        assert group is not None and not group.enabled
        calls = _count_qmm(monkeypatch)
        yc = mlp_b(x)
    assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(ya, yc, atol=1e-5)
    assert len(calls) == 3  # separate launches from then on


def test_autograd_exact_and_moves_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _model()
    fuse_siblings(m)
    attn = m.model.layers[0].self_attn
    calls = _count_qmm(monkeypatch)
    x = torch.randn(2, 64, requires_grad=True)
    attn.q_proj(x).sum().backward()  # autograd: its own launch, and a gradient
    assert x.grad is not None and calls == [64]
    calls.clear()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.exact = True
    with torch.inference_mode():
        xs = torch.randn(2, 64)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin(xs)
    assert calls == [64, 32, 32]
    calls.clear()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.exact = False
    with torch.no_grad():  # a trainer forward without grad ("old" log-probs): separate too
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin(xs.clone())
    assert calls == [64, 32, 32]
    calls.clear()
    with torch.inference_mode():  # the engine: one launch
        xs = torch.randn(2, 64)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin(xs)
    assert calls == [128]
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        lin.exact = False
    m.to(torch.float32)  # _apply: buffers may be replaced, so the groups unlink
    assert all(lin._sibling is None for lin in m.modules() if isinstance(lin, QuantLinear))


def test_nvfp4_unequal_global_scales_stay_separate() -> None:
    m = _model("nvfp4")
    gs = [m.model.layers[0].self_attn.q_proj.global_scale, m.model.layers[0].self_attn.k_proj.global_scale]
    assert not torch.equal(gs[0], gs[1])  # per-tensor scales of random weights differ
    assert fuse_siblings(m) == 0


def test_member_group_hands_out_the_first_members_outputs() -> None:
    """MemberGroup (sibling GEMVs, LoRA decode groups): the first member computes all outputs
    once; the others take theirs for the same input tensor; a member that finds outputs for
    another input turns the group off for good."""
    from orbit.quant.siblings import MemberGroup

    class Adds(MemberGroup):
        computed = 0

        def _compute(self, x, *args):
            self.computed += 1
            return [x + 1, x + 2, x + 3]

    members = [torch.nn.Identity() for _ in range(3)]
    g = Adds(members)
    x = torch.zeros(2)
    assert torch.equal(g.output(members[0], x), x + 1)
    assert torch.equal(g.output(members[2], x), x + 3)
    assert torch.equal(g.output(members[1], x), x + 2)
    assert g.computed == 1 and g._pending is None
    assert g.output(members[1], x) is None  # nothing waiting: the member computes alone
    g.output(members[0], x)
    assert g.output(members[1], x.clone()) is None  # another input: the group stands aside
    assert not g.enabled and g.output(members[0], x) is None and g.computed == 2


def _oft_model() -> CausalLM:
    """_model() with an active OFT adapter (block 16, a non-identity rotation) on every linear."""
    m = _model()
    torch.manual_seed(9)
    aset = inject_adapters(m, AdapterConfig(kind="oft", block_size=16, dtype=torch.float32))
    with torch.no_grad():
        for mod in aset.modules.values():
            mod.oft_R.normal_(std=0.1)
    aset.set_active(0)
    return m


def test_engine_oft_rotation_groups_match_lone_rotations(monkeypatch: pytest.MonkeyPatch) -> None:
    """With OFT on every linear, the engine links each q/k/v and gate/up set's rotations into
    one call (oft.link_oft_groups, with the sibling groups) and generates the same tokens and
    log-probs as an engine that rotates each input alone."""
    import orbit.adapters.oft as oft_mod

    monkeypatch.setattr(oft_mod, "GROUP_ROTATIONS", True)  # (whatever the default)

    group_calls: list[int] = []
    real = oft_mod.oft_rotate_group_frozen
    monkeypatch.setattr(oft_mod, "oft_rotate_group_frozen",
                        lambda x, sr, g: group_calls.append(g) or real(x, sr, g))
    sp = SamplingParams(temperature=0.8, max_new_tokens=6, ignore_eos=True, seed=4)
    outs, engines = [], []
    for fuse in (False, True):
        m = _oft_model()
        eng = Engine(m, max_num_seqs=3, max_model_len=32, fuse_siblings=fuse)
        engines.append(eng)
        outs.append(eng.generate(_prompts(), sp))
    assert engines[0].oft_groups == 0 and engines[1].oft_groups == 4  # 2 sets x 2 layers
    st = engines[1].last_stats  # every forward of the fused engine: one call per set and layer
    assert group_calls.count(3) == group_calls.count(2) == 2 * (st["prefill_steps"]
                                                                + st["decode_steps"])
    for ra, rb in zip(*outs):
        for ca, cb in zip(ra, rb):
            assert ca.tokens == cb.tokens and ca.logprobs == cb.logprobs


@pytest.mark.parametrize("rows", [1, 2])
def test_oft_stacked_base_runs_the_members_as_one_launch(monkeypatch: pytest.MonkeyPatch,
                                                         rows: int) -> None:
    """oft.STACKED_BASE: at decode rows the q/k/v (gate/up) bases of OFT linears run as one
    qmm over their stacked weight with every member's rotated rows (3 x rows <= SIBLING_MAX_M;
    past it each member runs alone), and each member gets what it computes alone."""
    import orbit.adapters.oft as oft_mod

    monkeypatch.setattr(oft_mod, "GROUP_ROTATIONS", True)  # (whatever the default)

    monkeypatch.setattr(oft_mod, "STACKED_BASE", True)
    models = [_oft_model(), _oft_model()]
    fuse_siblings(models[1])
    assert oft_mod.link_oft_groups(models[1]) == 4
    attn_a, attn_b = (m.model.layers[0].self_attn for m in models)
    mlp_a, mlp_b = (m.model.layers[0].mlp for m in models)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        alone = [lin(x) for lin in (attn_a.q_proj, attn_a.k_proj, attn_a.v_proj)] + [mlp_a(x)]
        calls = _count_qmm(monkeypatch)
        grouped = [lin(x) for lin in (attn_b.q_proj, attn_b.k_proj, attn_b.v_proj)]
        n_attn = len(calls)
        grouped.append(mlp_b(x))
    for a, b_ in zip(alone, grouped):
        assert torch.allclose(a, b_, atol=1e-5)
    # rows 1: q/k/v one launch over the stacked 128 output rows, gate/up one, down alone.
    # rows 2: q/k/v's 6 rows pass SIBLING_MAX_M, so each base is called with its own input:
    # the base group computes once for q's input, sees k's other input and stands aside
    # (3 launches; the rotations are still one); gate/up's 4 rows still stack
    assert n_attn == (1 if rows == 1 else 3)
    assert len(calls) == n_attn + 2
    assert calls[0] == 64 + 2 * 32
