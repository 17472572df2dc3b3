"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, the probability that at least one of k samples drawn
without replacement is correct is 1 - C(n-c, k) / C(n, k). The binomials overflow floats for
large n, so it is computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i), as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples, c of them correct (needs k <= n)."""
    if n <= 0 or k <= 0:
        raise ValueError(f"pass_at_k needs n > 0 and k > 0, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(
            f"pass_at_k needs k <= n (k={k}, n={n}): draw at least k samples per problem"
        )
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(per_problem: Sequence[Sequence[float]], k: int, threshold: float = 0.5) -> float:
    """Mean pass@k over problems; each inner list holds one problem's sample rewards, and a
    sample counts as correct when its reward is >= threshold (rewards in [0, 1])."""
    if not per_problem:
        raise ValueError("mean_pass_at_k: no problems")
    total = 0.0
    for i, rewards in enumerate(per_problem):
        if not rewards:
            raise ValueError(f"mean_pass_at_k: problem {i} has no samples")
        correct = sum(1 for r in rewards if r >= threshold)
        total += pass_at_k(len(rewards), correct, k)
    return total / len(per_problem)


def pass_at_k_table(
    per_problem: Sequence[Sequence[float]], ks: Sequence[int], threshold: float = 0.5
) -> dict[str, float]:
    """{"pass@k": value} for each k (k larger than the fewest samples per problem is skipped)."""
    fewest = min(len(r) for r in per_problem) if per_problem else 0
    return {
        f"pass@{k}": mean_pass_at_k(per_problem, k, threshold)
        for k in sorted(set(ks))
        if k <= fewest
    }
