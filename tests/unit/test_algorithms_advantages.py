"""Advantage estimators against hand-computed values on tiny inputs."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from orbit.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    AdvantageInputs,
    compute_advantages,
    discounted_returns,
    dr_grpo_advantages,
    grpo_advantages,
    masked_whiten,
    on_policy_distillation_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)

# group 0: {1, 0, 0, 1}; group 1: {2, 2} (all equal); group 7: a single sample.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 7])


def test_grpo_hand_values() -> None:
    adv = grpo_advantages(REWARDS, GROUPS, norm_by_std=True, eps=0.0 + 1e-6)
    # group 0: mean 0.5, unbiased var = 4 * 0.25 / 3, std = 1/sqrt(3); (±0.5) * sqrt(3)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)


def test_grpo_no_std_equals_dr_grpo() -> None:
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(grpo_advantages(REWARDS, GROUPS, norm_by_std=False), expected)
    torch.testing.assert_close(dr_grpo_advantages(REWARDS, GROUPS), expected)


def test_grpo_interleaved_groups_match_contiguous() -> None:
    perm = torch.tensor([6, 2, 4, 0, 5, 3, 1])
    adv = grpo_advantages(REWARDS[perm], GROUPS[perm])
    torch.testing.assert_close(adv, grpo_advantages(REWARDS, GROUPS)[perm])


def test_rloo_hand_values() -> None:
    adv = rloo_advantages(REWARDS, GROUPS)
    # r_i - mean of the other three: 1 - 1/3, 0 - 2/3
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)


def test_rloo_random_against_loop() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=g)
    groups = torch.arange(3).repeat_interleave(4)
    adv = rloo_advantages(rewards, groups)
    for i in range(12):
        others = [rewards[j].item() for j in range(12) if groups[j] == groups[i] and j != i]
        assert adv[i].item() == pytest.approx(
            rewards[i].item() - sum(others) / len(others), abs=1e-6
        )


def test_reinforce_pp_no_kl_hand_values() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), mask)
    # returns over response tokens: row0 [1, 1], row1 [0]; mean 2/3, unbiased var 1/3
    std = math.sqrt(1 / 3 + 1e-8)
    expected = torch.tensor(
        [[(1 - 2 / 3) / std, (1 - 2 / 3) / std, 0.0], [(0 - 2 / 3) / std, 0.0, 0.0]]
    )
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-7)


def test_reinforce_pp_kl_shaped_via_registry() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    ref = torch.zeros(2, 3)
    old = torch.tensor([[1.0, 2.0, 9.0], [0.5, 9.0, 9.0]])  # k1 = old - ref
    inp = AdvantageInputs(
        torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, old_logprobs=old, ref_logprobs=ref
    )
    adv = compute_advantages(
        "reinforce_plus_plus", inp, AdvantageConfig(kl_coef=0.1, kl_estimator="k1")
    )
    # token rewards: row0 [-0.1, -0.2 + 1], row1 [-0.05]; returns row0 [0.7, 0.8], row1 [-0.05]
    returns = [0.7, 0.8, -0.05]
    mu, sd = statistics.mean(returns), statistics.stdev(returns)
    expected = torch.tensor(
        [[(0.7 - mu) / sd, (0.8 - mu) / sd, 0.0], [(-0.05 - mu) / sd, 0.0, 0.0]]
    )
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-6)


def test_discounted_returns_gamma() -> None:
    r = torch.tensor([[1.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(
        discounted_returns(r, mask, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0]])
    )
    # gamma 0.5: G2 = 3, G1 = 2 + 1.5, G0 = 1 + 0.5 * 3.5
    torch.testing.assert_close(
        discounted_returns(r, mask, 0.5), torch.tensor([[2.75, 3.5, 3.0, 0.0]])
    )


def test_masked_whiten_single_token_is_zero() -> None:
    x = torch.tensor([[3.0, 4.0]])
    assert torch.equal(masked_whiten(x, torch.tensor([[1, 0]])), torch.zeros(1, 2))


def test_opd_is_teacher_minus_student_masked() -> None:
    teacher = torch.tensor([[-0.1, -2.0, -5.0]])
    student = torch.tensor([[-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv = on_policy_distillation_advantages(teacher, student, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.4, -1.0, 0.0]]))
    inp = AdvantageInputs(
        torch.zeros(1),
        torch.zeros(1, dtype=torch.long),
        mask,
        old_logprobs=student,
        teacher_logprobs=teacher,
    )
    torch.testing.assert_close(compute_advantages("on_policy_distillation", inp), adv)


def test_registry_broadcasts_and_masks() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    inp = AdvantageInputs(rewards, groups, mask)
    for name in ("grpo", "dr_grpo", "gspo", "rloo"):
        adv = compute_advantages(name, inp)
        assert adv.shape == (4, 3) and adv.dtype == torch.float32
        assert torch.all(adv[mask == 0] == 0)
    dr = compute_advantages("dr_grpo", inp)
    torch.testing.assert_close(dr[0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(dr[2], torch.tensor([1.0, 1.0, 1.0]))
    assert set(ADVANTAGE_ESTIMATORS) == {
        "grpo",
        "dr_grpo",
        "gspo",
        "rloo",
        "reinforce_plus_plus",
        "on_policy_distillation",
    }


def test_all_equal_rewards_give_zero_advantage() -> None:
    rewards = torch.full((6,), 0.7)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        assert torch.all(fn(rewards, groups) == 0)


def test_errors_name_the_missing_input() -> None:
    inp = AdvantageInputs(torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_advantages("on_policy_distillation", inp)
    with pytest.raises(ValueError, match="old_logprobs"):
        compute_advantages("reinforce_plus_plus", inp, AdvantageConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo_gae", inp)
    with pytest.raises(ValueError, match="rewards must be"):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))


def test_equal_float64_rewards_are_exactly_zero_even_without_eps() -> None:
    # sum/n of three copies of this value rounds away from it; the group is still all-equal.
    r = torch.full((3,), 7.757372428179119e-10, dtype=torch.float64)
    g = torch.zeros(3, dtype=torch.long)
    assert torch.all(grpo_advantages(r, g, eps=0.0) == 0)
    assert torch.all(rloo_advantages(r, g) == 0)


def test_integer_rewards_give_float_advantages() -> None:
    r = torch.tensor([1, 0, 0, 1])
    g = torch.tensor([0, 0, 0, 0])
    assert grpo_advantages(r, g).dtype == torch.float32
    torch.testing.assert_close(rloo_advantages(r, g), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    mask = torch.ones(4, 2)
    assert reinforce_plus_plus_advantages(r, mask).dtype == torch.float32


def test_padding_garbage_does_not_leak_into_token_advantages() -> None:
    nan = float("nan")
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    teacher = torch.tensor([[-1.0, -2.0, nan], [-0.5, nan, nan]])
    student = torch.tensor([[-1.5, -1.0, nan], [-0.5, float("-inf"), nan]])
    ref = torch.tensor([[-1.0, -1.0, nan], [-1.0, nan, nan]])
    inp = AdvantageInputs(
        torch.tensor([1.0, 0.0]),
        torch.tensor([0, 0]),
        mask,
        old_logprobs=student,
        ref_logprobs=ref,
        teacher_logprobs=teacher,
    )
    opd = compute_advantages("on_policy_distillation", inp)
    torch.testing.assert_close(opd, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    rpp = compute_advantages("reinforce_plus_plus", inp, AdvantageConfig(kl_coef=0.1))
    assert torch.isfinite(rpp).all() and torch.all(rpp[mask == 0] == 0)
