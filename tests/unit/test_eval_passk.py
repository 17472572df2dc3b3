"""pass@k against the binomial definition computed with exact integers."""

from __future__ import annotations

from math import comb

import pytest

from orbit.eval.passk import mean_pass_at_k, pass_at_k, pass_at_k_table


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (4, 0, 2), (4, 4, 1), (200, 17, 10), (5, 2, 4)]
)
def test_pass_at_k_matches_binomial_formula(n: int, c: int, k: int) -> None:
    expected = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_hand_values() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 = c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert pass_at_k(1000, 0, 100) == 0.0


def test_large_n_is_stable() -> None:
    # C(10000, 500) overflows a float; the product form does not.
    value = pass_at_k(10000, 3, 500)
    assert value == pytest.approx(1 - comb(9997, 500) / comb(10000, 500), rel=1e-9)


def test_mean_and_table() -> None:
    per_problem = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert mean_pass_at_k(per_problem, 1) == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert mean_pass_at_k(per_problem, 2) == pytest.approx((0.5 + (1 - 1 / 6) + 0.0) / 3)
    table = pass_at_k_table(per_problem, [1, 4, 8])
    assert set(table) == {"pass@1", "pass@4"}
    assert table["pass@4"] == pytest.approx(2 / 3)
    assert mean_pass_at_k([[0.4, 0.6]], 1, threshold=0.5) == pytest.approx(0.5)


def test_errors() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="no samples"):
        mean_pass_at_k([[1.0], []], 1)
