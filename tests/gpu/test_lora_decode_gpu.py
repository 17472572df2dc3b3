"""Fused LoRA decode on CUDA (orbit/kernels/lora_decode.py, orbit/adapters/lora_decode.py): the
two kernels at the Qwen3-1.7B shapes against the unfused forward on fresh random inputs, and
the engine with a LoRA slot active, graph-replayed and PDL-launched, fused vs plain."""

from __future__ import annotations

import pytest
import torch
from gpu_models import mixed_prompts, run_engine, small_qwen3

from orbit.adapters.inject import AdapterConfig, inject_adapters
from orbit.adapters.lora_decode import unlink_lora_decode
from orbit.kernels.lora_decode import lora_decode_reference, lora_decode_triton
from orbit.rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("m", [1, 7, 16, 64])
@pytest.mark.parametrize("k,ns", [(2048, [2048, 1024, 1024]), (2048, [6144, 6144]),
                                  (2048, [2048]), (6144, [2048])])
def test_kernels_at_qwen3_shapes(m: int, k: int, ns: list[int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(m + k + len(ns))
    r = 16

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") * s).bfloat16()

    x = rnd(m, k)
    a = [rnd(r, k, s=0.02) for _ in ns]
    b = [rnd(n, r, s=0.05) for n in ns]
    big = rnd(m, sum(ns))
    y = list(torch.split(big, ns, dim=1))
    ref = lora_decode_reference(x, a, b, [t.clone() for t in y], 2.0)
    before = big.clone()
    lora_decode_triton(x, a, b, y, 2.0)
    for yi, ri, bi in zip(y, ref, torch.split(before, ns, dim=1)):
        assert not torch.equal(yi, bi)  # written
        diff = (yi.float() - ri.float()).abs()
        # Only the summation order differs from cuBLAS: a rounding step of h, of the delta or
        # of y may land one bf16 ulp away, so the bound is an ulp of y plus two of the delta.
        delta = (ri.float() - bi.float()).abs()
        tol = (ri.float().abs() + 2 * delta) * 2.0 ** -7 * 1.01
        assert (diff <= tol).all(), (diff - tol).max()
        assert (diff > 0).float().mean() < 0.1


def test_engine_fused_lora_matches_plain() -> None:
    """Slot 1 holds a nonzero adapter; greedy completions and their log-probs with the decode
    groups equal the plain LoRA forward's up to summation order, at batch 1 and 4, graphs and
    PDL on; an engine with fuse_lora=False runs the plain path."""
    model = small_qwen3("int4")
    aset = inject_adapters(model, AdapterConfig(r=16, alpha=32.0))
    with torch.no_grad():
        for mod in aset.modules.values():
            mod.lora_B.normal_(0.0, 0.05)
    aset.stage(0, 1)
    aset.set_active(1)
    ps = mixed_prompts(3)
    sp = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for fuse in (False, True):
            unlink_lora_decode(model)
            eng, out = run_engine(model, ps, sp, batch, fuse_lora=fuse)
            assert (eng.lora_groups > 0) is fuse
            outs.append(out)
        for plain, fused in zip(*outs):
            n = next((i for i, (a, b) in enumerate(zip(plain.tokens, fused.tokens)) if a != b),
                     len(plain.tokens))
            assert n >= 8, (plain.tokens, fused.tokens)  # greedy on a sharp head: no early tie
            lp = torch.tensor(plain.logprobs[:n])
            lf = torch.tensor(fused.logprobs[:n])
            assert (lp - lf).abs().max() < 0.05, (lp, lf)
    # the adapter matters here (else the comparison above proves nothing)
    unlink_lora_decode(model)
    aset.set_active(None)
    base = run_engine(model, ps, sp, 4)[1]
    assert any(b.tokens != f.tokens for b, f in zip(base, outs[1]))
