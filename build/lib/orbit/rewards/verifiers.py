"""Rule-based rewards: math (\\boxed{} answers), arithmetic exact match, countdown, format.

Each scorer is a plain function of (response text, label) -> float in [0, 1]. `BUILTIN_REWARDS`
wraps them as functions of a `Sample`, the form the RewardRunner calls.

Math: the built-in normalizer (parse.py) decides first; when it says "no" and math-verify is
importable, math-verify gets a second opinion (symbolic equality: "\\sqrt{4}" = "2", sets,
intervals). math-verify is only ever allowed to turn a 0 into a 1, so installing it never
changes a reward the built-in path already accepts. Its signal-based timeouts are disabled
because rewards run in worker threads, where signal.alarm is not allowed; the runner's
per-call timeout bounds it instead.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

from orbit.data.sample import Sample
from orbit.rewards.countdown import countdown_score
from orbit.rewards.parse import answers_match, final_answer, has_content, last_boxed, to_number

MATH_BACKENDS = ("auto", "builtin", "math_verify")
# The format bonus rewards a short, finished, boxed answer: "\\boxed{42}" or "The answer is
# \\boxed{42}." pass; a derivation around the box does not (counted outside the box content).
FORMAT_MAX_EXTRA_CHARS = 48
_END_TOKENS = re.compile(r"(<\|[a-z_]+\|>\s*)+$")


def math_verify_available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def _math_verify_equal(predicted: str, reference: str) -> bool:
    from math_verify import parse, verify  # optional dependency (orbit-rl[math])

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def math_score(response: str, label: Any, backend: str = "auto") -> float:
    """1.0 if the last \\boxed{...} of `response` equals `label` (a number or a LaTeX string,
    itself possibly boxed), else 0.0. No \\boxed{} -> 0.0."""
    if backend not in MATH_BACKENDS:
        raise ValueError(f"math backend must be one of {MATH_BACKENDS}, got {backend!r}")
    predicted = last_boxed(response)
    if predicted is None or label is None:
        return 0.0
    reference = str(label)
    reference = last_boxed(reference) or reference
    if answers_match(predicted, reference):
        return 1.0
    if backend == "math_verify" or (backend == "auto" and math_verify_available()):
        return 1.0 if _math_verify_equal(predicted, reference) else 0.0
    return 0.0


def arithmetic_score(response: str, label: Any) -> float:
    """Exact match of an integer answer. The final answer is the last \\boxed{} content; a
    response without \\boxed{} falls back to the last number it writes (so "... = 42." counts).
    """
    answer = final_answer(response)
    if answer is None or label is None:
        return 0.0
    got, want = to_number(answer), to_number(str(label))
    if got is None or want is None:
        return 0.0
    return 1.0 if got == want else 0.0


def format_score(response: str, finished: bool = True,
                 max_extra_chars: int = FORMAT_MAX_EXTRA_CHARS, prompt: str = "") -> float:
    """1.0 for a finished response whose last \\boxed{} holds an answer, ends it (only
    whitespace, '.', '$' or an end-of-turn token may follow) and has at most `max_extra_chars`
    characters outside the box, and whose box is not copied from `prompt`; else 0.0.

    Every condition closes a hack seen in practice: crediting any box let a policy emit
    \\boxed{} and then ramble until the length limit (`finished=False`, a truncated sample,
    gets nothing), or box early and keep writing (text after the box), or pad a long
    preamble around it (`max_extra_chars`), or copy the prompt's example box: a CPU
    quickstart run whose system prompt said "in the form \\boxed{N}" learned to answer
    "\\boxed{N}" to everything within five steps.
    """
    if not finished:
        return 0.0
    text = _END_TOKENS.sub("", response).rstrip().rstrip(".$").rstrip()
    box = last_boxed(text)
    if not has_content(box):
        return 0.0
    assert box is not None
    closing = text.rfind("{" + box + "}")
    if closing < 0 or closing + len(box) + 2 != len(text):  # something follows the box
        return 0.0
    if prompt and "{" + box + "}" in prompt:
        return 0.0
    return 1.0 if len(text) - len(box) <= max_extra_chars else 0.0


def countdown_label(label: Any) -> tuple[list[int], int]:
    """Countdown labels are {"numbers": [...], "target": int}."""
    if not isinstance(label, dict) or "numbers" not in label or "target" not in label:
        raise ValueError(
            f"countdown label must be a dict with 'numbers' and 'target', got {label!r}"
        )
    return [int(n) for n in label["numbers"]], int(label["target"])


def math_reward(sample: Sample) -> float:
    return math_score(sample.response_text, sample.label)


def arithmetic_reward(sample: Sample) -> float:
    # A response cut at the token limit has no final answer. Crediting its last number let a
    # CPU quickstart policy drift to rambling lists of numbers (truncated ratio 0.3 -> 1.0 in
    # ten steps), since a long enough list sometimes ends on the right one.
    if _truncated(sample):
        return 0.0
    return arithmetic_score(sample.response_text, sample.label)


def _truncated(sample: Sample) -> bool:
    # "length" (cut at the token limit) and "abort" are not finished answers; "" (a sample
    # built outside the engine) carries no such news.
    return sample.finish_reason in ("length", "abort")


def format_reward(sample: Sample) -> float:
    return format_score(sample.response_text, finished=not _truncated(sample),
                        prompt=sample.prompt_text)


def countdown_reward(sample: Sample) -> float:
    numbers, target = countdown_label(sample.label)
    return countdown_score(sample.response_text, numbers, target)


BUILTIN_REWARDS: dict[str, Callable[[Sample], float]] = {
    "math": math_reward,
    "arithmetic": arithmetic_reward,
    "countdown": countdown_reward,
    "format": format_reward,
}
