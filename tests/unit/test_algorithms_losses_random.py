"""Policy loss on random inputs against independent per-token Python loops in float64."""

from __future__ import annotations

import math

import pytest
import torch

from orbit.algorithms.losses import AGG_MODES, PolicyLossConfig, PolicyLossInputs, policy_loss


def _reference_loss(logp, old, adv, mask, eps_lo, eps_hi, c, mode, max_len) -> float:
    """Scalar loops over plain floats: the PPO/dual-clip surrogate and the four aggregations."""
    per_seq = []
    for i in range(len(logp)):
        vals = []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            loss = max(-a * r, -a * min(max(r, 1 - eps_lo), 1 + eps_hi))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            vals.append(loss)
        per_seq.append(vals)
    if mode == "token-mean":
        flat = [v for s in per_seq for v in s]
        return sum(flat) / len(flat)
    if mode == "seq-mean-token-sum":
        return sum(sum(s) for s in per_seq if s) / sum(1 for s in per_seq if s)
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in per_seq if s) / sum(1 for s in per_seq if s)
    return sum(sum(s) for s in per_seq) / (len(per_seq) * max_len)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("dual", [None, 2.5])
def test_ppo_loss_matches_loops(mode: str, dual: float | None) -> None:
    g = torch.Generator().manual_seed(10 * AGG_MODES.index(mode) + (dual is not None))
    b, t = 5, 7
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    old = (
        logp + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 1.2
    )  # ratios ~ 0.55..1.8
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 0])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    cfg = PolicyLossConfig(
        eps_clip=0.2, eps_clip_high=0.3, dual_clip_c=dual, loss_agg_mode=mode, max_response_len=9
    )
    out = policy_loss(PolicyLossInputs(logp, adv, mask, old_logprobs=old), cfg)
    expected = _reference_loss(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.3, dual, mode, 9
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < out.metrics["pg_clipfrac"].item() < 1


def test_gspo_gradient_equals_sequence_level_formula() -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 3, 6
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 0.2
    adv = torch.tensor([1.5, -0.7, 0.3], dtype=torch.float64)[:, None].expand(b, t)
    mask = torch.arange(t)[None, :] < torch.tensor([6, 2, 4])[:, None]
    cfg = PolicyLossConfig(policy_loss="gspo", eps_clip=5.0, loss_agg_mode="seq-mean-token-mean")
    policy_loss(PolicyLossInputs(logp, adv, mask, old_logprobs=old), cfg).loss.backward()

    # Paper form: J = mean_i A_i * s_i, s_i = exp(mean_t (logp - old)) -- no per-token detach tricks.
    logp2 = logp.detach().clone().requires_grad_(True)
    m = mask.double()
    s = torch.exp(((logp2 - old) * m).sum(-1) / m.sum(-1))
    (-(adv[:, 0] * s).mean()).backward()
    torch.testing.assert_close(logp.grad, logp2.grad)
