"""Engine(prefetch_weights=True) (orbit/rollout/l2_prefetch.py, experimental): the decode
attention launch's L2 prefetch of the weights after it is a hint, so tokens and log-prob bits
equal those without it, with CUDA graphs, at batch 1 and 4, for both table kinds and both
issuing launches (attention, q/k norm + RoPE); and the attention kernel alone returns the same
bits with a table whose pieces outnumber its programs."""

from __future__ import annotations

import pytest
import torch
from gpu_models import bits, mixed_prompts, run_engine, small_qwen3

from orbit.rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("ahead,where", [("rest", "attention"), ("next", "attention"),
                                         ("rest", "rope")])
def test_prefetch_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch, ahead: str,
                                      where: str) -> None:
    import orbit.rollout.l2_prefetch as pf

    monkeypatch.setattr(pf, "AHEAD", ahead)
    monkeypatch.setattr(pf, "WHERE", where)
    model = small_qwen3("int4")
    ps = mixed_prompts(9)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for on in (False, True):
            eng, out = run_engine(model, ps, sp, batch, prefetch_weights=on)
            assert (eng._l2_plan is not None) == on
            if on:
                assert sorted(eng._l2_plan) == [0, 1, 2]
            outs.append(bits(out))
        assert outs[0] == outs[1], batch


def test_kernel_with_a_prefetch_table_gives_the_same_bits() -> None:
    from orbit.kernels.attention_decode import attention_decode_split, pick_decode
    from orbit.kernels.pdl import L2Prefetch
    from orbit.rollout.l2_prefetch import plan_chunks

    torch.manual_seed(1)
    B, H, HKV, D, L = 2, 8, 2, 64, 300
    q = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(4, 512, HKV, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slots = torch.tensor([3, 1], device="cuda")
    start = torch.tensor([L - 1, 17], device="cuda")
    split, cfg = pick_decode(B, HKV, L, 132)
    weights = [torch.randn(3_000_001, device="cuda"), torch.randn(77, device="cuda")]
    addrs, sizes = plan_chunks(weights, chunk=1 << 12)  # ~2900 pieces, far more than programs
    table = L2Prefetch(torch.tensor(addrs, dtype=torch.int64, device="cuda"),
                       torch.tensor(sizes, dtype=torch.int32, device="cuda"))
    assert table.launch_args(B * HKV * split)[1]["PF_PER"] > 1
    ref = attention_decode_split(q, kc, vc, slots, start, L, split, config=cfg)
    out = attention_decode_split(q, kc, vc, slots, start, L, split, config=cfg, l2_prefetch=table)
    torch.cuda.synchronize()
    assert torch.equal(ref, out)
