"""Countdown verifier: does the model's equation reach the target with the given numbers?

The response is untrusted text, so it is never passed to eval(). It is parsed with `ast` and
walked by a tiny interpreter that accepts only integer literals, + - * / and parentheses,
computes with exact fractions, and records which literals were used so the "each number at
most once" rule can be checked against the multiset of given numbers.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction

from orbit.rewards.parse import last_boxed

MAX_EXPRESSION_CHARS = 256
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class ExpressionError(ValueError):
    """The text is not an arithmetic expression over integer literals."""


def _walk(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left, used), _walk(node.right, used)
        op = _OPS[type(node.op)]
        if op == "+":
            return left + right
        if op == "-":
            return left - right
        if op == "*":
            return left * right
        if right == 0:
            raise ExpressionError("division by zero")
        return left / right
    # Unary minus is rejected on purpose: "-5" would conjure a number not in the list.
    raise ExpressionError(f"unsupported syntax {type(node).__name__}")


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]]:
    """Exact value of `expr` and the integer literals it uses, in order. 'x', '×' and '÷' are
    read as * and /. Raises ExpressionError for anything else."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = expr.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/")
    text = text.replace("×", "*").replace("÷", "/").replace("x", "*").replace("X", "*")
    text = text.replace("\\left", "").replace("\\right", "").replace("{", "(").replace("}", ")")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"not an expression: {expr!r}") from e
    used: list[int] = []
    return _walk(tree, used), used


def extract_equation(response: str) -> str | None:
    """The candidate equation: last \\boxed{} content, else the last <answer>...</answer>;
    a trailing '= target' is dropped ("(3 + 5) * 3 = 24" -> "(3 + 5) * 3")."""
    found = last_boxed(response)
    if found is None:
        tags = _ANSWER_TAG.findall(response)
        found = tags[-1] if tags else None
    if found is None:
        return None
    return found.split("=")[0].strip() or None


def countdown_score(response: str, numbers: list[int], target: int, use_all: bool = False) -> float:
    """1.0 if the extracted equation evaluates exactly to `target` using each given number at
    most once (exactly once with `use_all`), else 0.0."""
    expr = extract_equation(response)
    if expr is None:
        return 0.0
    try:
        value, used = evaluate_expression(expr)
    except ExpressionError:
        return 0.0
    have, want = Counter(numbers), Counter(used)
    if any(want[n] > have[n] for n in want):
        return 0.0
    if use_all and want != have:
        return 0.0
    return 1.0 if value == target else 0.0
