"""Engine(prefetch_weights=True) (orbit/rollout/l2_prefetch.py, experimental): the side-stream L2
prefetch of the next block's weights is a hint, so tokens and log-prob bits equal those
without it, with CUDA graphs (which hold the side branch) at batch 1 and 4; and it runs."""

from __future__ import annotations

import pytest
import torch
from gpu_models import bits, mixed_prompts, run_engine, small_qwen3

from orbit.rollout.types import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_prefetch_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import orbit.rollout.l2_prefetch as pf

    launches = []
    real = pf.WeightPrefetcher._prefetch

    def counted(self, module, args):
        launches.append(self._on)
        return real(self, module, args)

    monkeypatch.setattr(pf.WeightPrefetcher, "_prefetch", counted)
    model = small_qwen3("int4")
    ps = mixed_prompts(9)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=3, ignore_eos=True)
    for batch in (1, 4):
        outs = []
        for on in (False, True):
            eng, out = run_engine(model, ps, sp, batch, prefetch_weights=on)
            outs.append(bits(out))
            if eng._prefetcher is not None:
                eng._prefetcher.remove()
        assert outs[0] == outs[1], batch
    assert any(launches)  # the hooks launched prefetches inside decode steps
