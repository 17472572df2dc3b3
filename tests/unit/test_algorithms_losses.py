"""Policy losses, KL estimators and importance weights against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from orbit.algorithms.importance import importance_weights
from orbit.algorithms.kl import kl_estimate, kl_shaped_rewards
from orbit.algorithms.losses import (
    PolicyLossConfig,
    PolicyLossInputs,
    aggregate_loss,
    gspo_log_ratio,
    policy_loss,
)


def _logp(ratios: list[list[float]]) -> torch.Tensor:
    return torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)


def test_aggregation_modes_hand_values() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # constant normalizer: all 3 rows, max_response_len 4
    got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_response_len=4)
    assert got.item() == pytest.approx((6 + 4) / (3 * 4))
    assert aggregate_loss(loss, mask, "token-mean", num_tokens=20).item() == pytest.approx(10 / 20)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(loss, mask, "sum")


def test_ppo_clip_asymmetric_hand_values_and_grad() -> None:
    logp = _logp([[1.5, 0.7, 1.0, 1.1]])  # old = 0, so ratio = these values
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    out = policy_loss(
        PolicyLossInputs(logp, adv, mask, old_logprobs=torch.zeros_like(logp)),
        PolicyLossConfig(eps_clip=0.2),
    )
    # token0: max(-1.5, -1.2) = -1.2 (clipped high); token1: max(0.7, 0.8) = 0.8 (clipped low)
    # token2: -2.0 (ratio 1); token3 masked
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert out.metrics["pg_clipfrac"].item() == pytest.approx(2 / 3)
    assert out.metrics["pg_clipfrac_high"].item() == pytest.approx(1 / 3)
    assert out.metrics["pg_clipfrac_low"].item() == pytest.approx(1 / 3)
    assert out.metrics["ppo_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.7)) / 3)
    out.loss.backward()
    # d/dlogp of -A * exp(logp) is -A * ratio on unclipped tokens, 0 on clipped/masked ones
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.0, 0.0, -2.0 / 3, 0.0]], dtype=torch.float64)
    )

    wide = policy_loss(
        PolicyLossInputs(logp.detach(), adv, mask, old_logprobs=torch.zeros_like(logp)),
        PolicyLossConfig(eps_clip=0.2, eps_clip_high=0.6),
    )
    assert wide.loss.item() == pytest.approx((-1.5 + 0.8 - 2.0) / 3)
    assert wide.metrics["pg_clipfrac_high"].item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss() -> None:
    logp = _logp([[5.0, 5.0]])
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    cfg = PolicyLossConfig(eps_clip=0.2, dual_clip_c=3.0, loss_agg_mode="seq-mean-token-sum")
    out = policy_loss(PolicyLossInputs(logp, adv, mask, old_logprobs=torch.zeros_like(logp)), cfg)
    # A<0: max(5, 1.2) = 5 -> min(5, 3) = 3; A>0: max(-5, -1.2) = -1.2
    assert out.loss.item() == pytest.approx(3.0 - 1.2)
    assert out.metrics["pg_clipfrac_dual"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip_c"):
        PolicyLossConfig(dual_clip_c=0.5)


def test_on_policy_default_old_is_detached_logprobs() -> None:
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    out = policy_loss(PolicyLossInputs(logp, adv, torch.ones(1, 2)))
    assert out.loss.item() == pytest.approx(-0.5)  # ratio 1 everywhere
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -0.25, dtype=torch.float64))


def test_gspo_sequence_ratio_value_grad_and_clip() -> None:
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor(
        [[0.1, 0.3, 7.0], [0.2, -0.2, 0.4]], dtype=torch.float64, requires_grad=True
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lr = gspo_log_ratio(logp, old, mask)
    torch.testing.assert_close(lr.detach()[:, 0], torch.tensor([0.2, 0.4 / 3], dtype=torch.float64))

    adv = torch.tensor([[1.0] * 3, [-2.0] * 3], dtype=torch.float64)
    cfg = PolicyLossConfig(policy_loss="gspo", eps_clip=10.0, loss_agg_mode="seq-mean-token-mean")
    out = policy_loss(PolicyLossInputs(logp, adv, mask, old_logprobs=old), cfg)
    s0, s1 = math.exp(0.2), math.exp(0.4 / 3)
    assert out.loss.item() == pytest.approx((-1.0 * s0 + 2.0 * s1) / 2)
    out.loss.backward()
    # sequence-level gradient: d/dlogp_t of -A s = -A s / |y| per token, then / 2 sequences
    expected = torch.tensor(
        [[-s0 / 2 / 2, -s0 / 2 / 2, 0.0], [2 * s1 / 3 / 2] * 3], dtype=torch.float64
    )
    torch.testing.assert_close(logp.grad, expected)

    tight = PolicyLossConfig(
        policy_loss="gspo", eps_clip=3e-4, eps_clip_high=4e-4, loss_agg_mode="seq-mean-token-mean"
    )
    out = policy_loss(PolicyLossInputs(logp.detach(), adv, mask, old_logprobs=old), tight)
    # row0 A>0, s > 1 + 4e-4 -> clipped to -(1 + 4e-4); row1 A<0, s > 1: unclipped 2 s1
    assert out.loss.item() == pytest.approx((-(1 + 4e-4) + 2 * s1) / 2)
    assert out.metrics["pg_clipfrac"].item() == pytest.approx(2 / 5)


def test_kl_estimators_hand_values() -> None:
    logp = torch.tensor([0.5, -1.0])
    ref = torch.tensor([0.0, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor(k3))
    torch.testing.assert_close(kl_estimate(logp, ref, "low_var_kl"), torch.tensor(k3))
    assert kl_estimate(torch.tensor([-50.0]), torch.tensor([0.0]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="unknown kl estimator"):
        kl_estimate(logp, ref, "k4")


def test_kl_loss_term_and_entropy_bonus() -> None:
    logp = torch.tensor([[0.5, -1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(1, 3, dtype=torch.float64)
    ent = torch.tensor([[2.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.zeros(1, 3, dtype=torch.float64)
    cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator="k2", entropy_coef=0.01)
    out = policy_loss(PolicyLossInputs(logp, adv, mask, ref_logprobs=ref, entropy=ent), cfg)
    kl = (0.125 + 0.5) / 2
    assert out.metrics["kl_loss"].item() == pytest.approx(kl)
    assert out.metrics["entropy"].item() == pytest.approx(3.0)
    assert out.loss.item() == pytest.approx(0.1 * kl - 0.01 * 3.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(PolicyLossInputs(logp, adv, mask), PolicyLossConfig(kl_coef=0.1))


def test_kl_shaped_rewards() -> None:
    logp = torch.tensor([[1.0, 2.0, 0.0]])
    out = kl_shaped_rewards(
        torch.tensor([5.0]), logp, torch.zeros(1, 3), torch.tensor([[1, 1, 0]]), 0.1, "k1"
    )
    torch.testing.assert_close(out, torch.tensor([[-0.1, -0.2 + 5.0, 0.0]]))


def test_tis_and_mis_weights() -> None:
    old = torch.log(torch.tensor([[3.0, 0.5, 1.0, 9.0]]))
    rollout = torch.zeros(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    isw = importance_weights(old, rollout, mask, tis_cap=2.0)
    torch.testing.assert_close(isw.weights, torch.tensor([[2.0, 0.5, 1.0, 0.0]]))
    assert isw.metrics["tis_clipfrac"].item() == pytest.approx(1 / 3)
    assert isw.metrics["is_ratio_max"].item() == pytest.approx(3.0)
    assert isw.metrics["is_ratio_min"].item() == pytest.approx(0.5)
    assert isw.metrics["is_ratio_mean"].item() == pytest.approx(4.5 / 3)

    mis = importance_weights(old, rollout, mask, mis_low=0.6, mis_high=2.5)
    assert mis.keep_mask.tolist() == [[False, False, True, False]]
    assert mis.metrics["mis_maskfrac"].item() == pytest.approx(2 / 3)
    seq = importance_weights(old, rollout, mask, mis_low=0.6, mis_high=2.5, mis_level="sequence")
    assert not seq.keep_mask.any()


def test_tis_in_policy_loss_scales_tokens() -> None:
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    adv = torch.ones(1, 2, dtype=torch.float64)
    rollout = torch.tensor(
        [[math.log(1 / 3), 0.0]], dtype=torch.float64
    )  # ratio old/rollout = 3, 1
    cfg = PolicyLossConfig(tis_cap=2.0)
    out = policy_loss(
        PolicyLossInputs(
            logp, adv, torch.ones(1, 2), old_logprobs=torch.zeros(1, 2), rollout_logprobs=rollout
        ),
        cfg,
    )
    assert out.loss.item() == pytest.approx((-2.0 - 1.0) / 2)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(PolicyLossInputs(logp, adv, torch.ones(1, 2)), cfg)


def test_shape_mismatch_names_the_tensor() -> None:
    with pytest.raises(ValueError, match="advantages"):
        PolicyLossInputs(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_garbage_in_padding_never_reaches_loss_or_grad() -> None:
    nan, inf = float("nan"), float("inf")
    logp = torch.tensor([[-0.5, nan, inf]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.4, -inf, nan]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0]])
    adv = torch.tensor([[1.0, nan, nan]], dtype=torch.float64)
    cfg = PolicyLossConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0)
    out = policy_loss(
        PolicyLossInputs(
            logp,
            adv,
            mask,
            old_logprobs=old,
            rollout_logprobs=old,
            ref_logprobs=torch.full((1, 3), nan, dtype=torch.float64).index_fill_(
                1, torch.tensor([0]), -0.5
            ),
            entropy=torch.tensor([[1.0, nan, inf]], dtype=torch.float64),
        ),
        cfg,
    )
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    assert logp.grad[0, 1:].tolist() == [0.0, 0.0]
