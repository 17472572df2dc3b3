"""Properties that must hold for any rewards/groups (hypothesis), beyond the hand examples."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orbit.algorithms.advantages import grpo_advantages, rloo_advantages
from orbit.eval.passk import pass_at_k

rewards_and_groups = st.lists(
    st.tuples(st.floats(-10, 10, allow_nan=False), st.integers(0, 4)), min_size=1, max_size=24
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rewards_and_groups)
def test_group_advantages_sum_to_zero_and_have_unit_std(rows: list[tuple[float, int]]) -> None:
    r = torch.tensor([x for x, _ in rows], dtype=torch.float64)
    g = torch.tensor([k for _, k in rows])
    a = grpo_advantages(r, g, eps=0.0)
    loo = rloo_advantages(r, g)
    for k in g.unique():
        sel = g == k
        assert abs(a[sel].sum().item()) < 1e-9
        assert abs(loo[sel].sum().item()) < 1e-9
        n = int(sel.sum())
        spread = r[sel].max() - r[sel].min()
        if n > 1 and spread > 1e-6:
            assert abs(a[sel].std().item() - 1.0) < 1e-6
        elif spread == 0:
            assert torch.all(a[sel] == 0)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 60), st.data())
def test_pass_at_k_is_monotone_in_k_and_c(n: int, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, n))
    values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
    assert abs(values[0] - c / n) < 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, 1) > pass_at_k(n, c, 1)
