"""Answer parsing and the rule-based verifiers on the cases that break naive regexes."""

from __future__ import annotations

from fractions import Fraction

import pytest

from orbit.data.sample import Sample
from orbit.rewards.countdown import ExpressionError, countdown_score, evaluate_expression
from orbit.rewards.parse import (
    answers_match,
    final_answer,
    last_boxed,
    last_number,
    normalize_answer,
    to_number,
)
from orbit.rewards.verifiers import (
    arithmetic_reward,
    arithmetic_score,
    format_reward,
    format_score,
    math_score,
    math_verify_available,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\text{x}^{2} + {3}}", "\\text{x}^{2} + {3}"),
        ("answer: $\\boxed{-7}$", "-7"),
        ("\\boxed 5 is it", "5"),
        ("\\fbox{9}", "9"),
        ("no box here 12", None),
        ("broken \\boxed{12", None),
        ("ok \\boxed{3} then broken \\boxed{4", "3"),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("42", Fraction(42)),
        (" -17 ", Fraction(-17)),
        ("1,000", Fraction(1000)),
        ("1{,}234.5", Fraction(24690, 20)),
        ("$12$.", Fraction(12)),
        ("\\text{12}", Fraction(12)),
        ("12 \\text{ }", Fraction(12)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("-\\frac{2}{4}", Fraction(-1, 2)),
        ("\\frac{-2}{4}", Fraction(-1, 2)),
        ("\\frac12", Fraction(1, 2)),
        ("3/6", Fraction(1, 2)),
        ("0.50", Fraction(1, 2)),
        ("x = 7", Fraction(7)),
        ("50\\%", Fraction(50)),
        ("\\$1,200", Fraction(1200)),
        ("12 \\text{ cm}", Fraction(12)),
        ("7\\mbox{dollars}.", Fraction(7)),
        ("\\sqrt{2}", None),
        ("1,00", None),
        ("\\frac{1}{0}", None),
    ],
)
def test_to_number(raw: str, value: Fraction | None) -> None:
    assert to_number(raw) == value


def test_answers_match_numeric_and_string() -> None:
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("1,000", "1000.0")
    assert not answers_match("0.33", "\\frac{1}{3}")
    assert answers_match("\\text{(B)}", "(B)")
    assert not answers_match("", "")
    assert normalize_answer(" \\left( 1, 2 \\right) ") == "(1,2)"


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("The answer is \\boxed{\\dfrac{1}{2}}.", "0.5", 1.0),
        ("The answer is \\boxed{ 1,024 }", 1024, 1.0),
        ("Therefore $\\boxed{-3}$", "-3", 1.0),
        ("Therefore $\\boxed{-3}$", "3", 0.0),
        ("I think 12", "12", 0.0),  # math needs \boxed
        ("\\boxed{12} wait no \\boxed{13}", "12", 0.0),
        ("\\boxed{\\text{yes}}", "yes", 1.0),
        ("\\boxed{\\text{yes}}", "no", 0.0),
        ("so \\boxed{18 \\text{ apples}}.", "18", 1.0),
        ("\\boxed{5}", "\\boxed{5}", 1.0),
    ],
)
def test_math_score_builtin(response: str, label: object, reward: float) -> None:
    assert math_score(response, label, backend="builtin") == reward


def test_math_score_math_verify_backend_adds_symbolic_equality() -> None:
    if not math_verify_available():
        pytest.skip("math-verify not installed (optional extra orbit-rl[math])")
    assert math_score("\\boxed{\\sqrt{4}}", "2", backend="builtin") == 0.0
    assert math_score("\\boxed{\\sqrt{4}}", "2", backend="math_verify") == 1.0
    assert math_score("\\boxed{3}", "2", backend="math_verify") == 0.0


def test_math_score_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="math backend"):
        math_score("\\boxed{1}", "1", backend="sympy")


@pytest.mark.parametrize(
    ("response", "label", "reward"),
    [
        ("12 + 7 x 3 = 12 + 21 = \\boxed{33}", 33, 1.0),
        ("so the result is 33.", 33, 1.0),  # no box: last number
        ("so the result is -8", -8, 1.0),
        ("5 - 13 = -8, so \\boxed{8}", -8, 0.0),  # the box wins over the last number
        ("it is 1,200", 1200, 1.0),
        ("I don't know", 3, 0.0),
        ("\\boxed{three}", 3, 0.0),
        # real SmolLM2 outputs echo the prompt's empty box; it must not hide the answer
        (
            "to find the final answer in \\boxed{}.\n\n83 - 25 = 58\n\nSo, the answer is 58.",
            58,
            1.0,
        ),
        ("59 x 8 = 472 and the final answer is 472 in \\boxed{{}.}", 472, 1.0),
    ],
)
def test_arithmetic_score(response: str, label: int, reward: float) -> None:
    assert arithmetic_score(response, label) == reward


def test_final_answer_and_last_number() -> None:
    assert last_number("a 3, b -4.5, c 7.") == "7"
    assert final_answer("x \\boxed{2} 9") == "2"
    assert final_answer("nothing") is None


def test_format_score() -> None:
    assert format_score("... \\boxed{4}") == 1.0
    assert format_score("... \\boxed{ }") == 0.0
    assert format_score("the answer is 426 in \\boxed{{}.}") == 0.0
    assert format_score("... 4") == 0.0


def test_format_score_credits_only_a_short_finished_boxed_answer() -> None:
    assert format_score("\\boxed{42}") == 1.0
    assert format_score("The answer is $\\boxed{-7}$.<|im_end|>") == 1.0
    # the hack seen in a GPU run: box, then ramble until the token limit
    assert format_score("\\boxed{42}", finished=False) == 0.0
    assert format_score("\\boxed{42} Now let us also consider the case where") == 0.0
    assert format_score("step " * 20 + "\\boxed{42}") == 0.0  # a derivation around the box
    assert format_score("x" * 10 + "\\boxed{42}", max_extra_chars=9) == 0.0
    assert format_score("\\boxed{}") == 0.0
    # an example box copied from the prompt is not an answer
    assert format_score("\\boxed{N}", prompt="Reply in the form \\boxed{N}.") == 0.0
    assert format_score("\\boxed{12}", prompt="Reply in the form \\boxed{N}.") == 1.0


def test_format_reward_reads_finish_reason() -> None:
    done = Sample(prompt_ids=[1], response_text="\\boxed{3}", finish_reason="stop")
    cut = Sample(prompt_ids=[1], response_text="\\boxed{3}", finish_reason="length")
    assert format_reward(done) == 1.0 and format_reward(cut) == 0.0
    done.label = cut.label = 3
    assert arithmetic_reward(done) == 1.0 and arithmetic_reward(cut) == 0.0


def test_countdown_evaluator_is_exact_and_safe() -> None:
    assert evaluate_expression("(100 - 4) / 3 x 2") == (Fraction(64), [100, 4, 3, 2])
    assert evaluate_expression("7 \\times 8")[0] == 56
    for bad in (
        "__import__('os').system('true')",
        "2 ** 10",
        "-5 + 10",
        "1 / 0",
        "a + 1",
        "1.5 + 2",
    ):
        with pytest.raises(ExpressionError):
            evaluate_expression(bad)


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("\\boxed{(25 - 1) * 4 / 4}", 1.0),  # 4 used twice: allowed, 4 appears twice in the list
        ("<answer>25 - 1</answer>", 1.0),
        ("\\boxed{25 - 1 = 24}", 1.0),
        ("\\boxed{(25 - 1) * 1}", 0.0),  # 1 used twice, given once
        ("\\boxed{6 * 4}", 0.0),  # 6 not given
        ("\\boxed{25 + 4}", 0.0),  # wrong value
        ("no equation", 0.0),
        ("\\boxed{__import__('os')}", 0.0),
    ],
)
def test_countdown_score(response: str, reward: float) -> None:
    assert countdown_score(response, [25, 1, 4, 4], 24) == reward


def test_countdown_use_all() -> None:
    assert countdown_score("\\boxed{25 - 1}", [25, 1, 4], 24, use_all=True) == 0.0
    assert countdown_score("\\boxed{(25 - 1) * 4 / 4}", [25, 1, 4, 4], 24, use_all=True) == 1.0


def test_math_verify_backend_runs_in_worker_threads() -> None:
    # math-verify's default timeouts use signal.alarm, which only works in the main thread;
    # the RewardRunner calls verifiers from a thread pool.
    if not math_verify_available():
        pytest.skip("math-verify not installed (optional extra orbit-rl[math])")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = pool.submit(math_score, "\\boxed{\\frac{6}{\\sqrt{9}}}", "2", "math_verify").result()
    assert got == 1.0
