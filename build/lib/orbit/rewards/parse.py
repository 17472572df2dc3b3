"""Answer extraction and normalization for rule-based verifiers (the built-in fallback).

Rewards are the training signal, so a parsing slip is a silent bug: "\\boxed{1,000.}" must
equal 1000 and "\\boxed{\\frac{1}{2}}" must equal 0.5. This module finds the last
\\boxed{...} (nested braces included), strips LaTeX decoration and compares numbers exactly
with fractions.Fraction; anything that is not a number is compared as a normalized string.
math-verify, when installed, handles the symbolic cases this does not (see verifiers.py).
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_WRAPPERS = ("\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\textrm", "\\mbox")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FRAC = re.compile(r"^([-+]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT = re.compile(r"^([-+]?)\\frac(\d)(\d)$")
_SLASH = re.compile(r"^([-+]?\d+)/(\d+)$")
_VAR_PREFIX = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")
# A trailing unit after a value: "12 \text{ cm}" -> "12" (a lone "\text{yes}" is kept).
_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]+\}\s*\.?\s*$")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """`text[start] == '{'` -> (content up to the matching '}', index after it)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces kept), or of the short
    form "\\boxed 42"; None when there is none or its braces never close."""
    pos = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    while pos >= 0:
        cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, pos))
        rest = pos + len(cmd)
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            got = _braced(text, rest)
            if got is not None:
                return got[0]
        elif rest > pos + len(cmd):  # "\boxed 42": up to the next space or '$'
            m = re.match(r"[^\s$]+", text[rest:])
            if m:
                return m.group(0)
        pos = max(text.rfind(c, 0, pos) for c in _BOX_COMMANDS)
    return None


def _unwrap(s: str, command: str) -> str:
    """Replace every `command{X}` by X (balanced braces)."""
    out, i = [], 0
    while True:
        j = s.find(command + "{", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        got = _braced(s, j + len(command))
        if got is None:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:j])
        out.append(got[0])
        i = got[1]


def normalize_answer(answer: str) -> str:
    """Canonical string form: LaTeX spacing/wrappers, a trailing \\text{unit}, '$' and '\\$',
    spaces, a trailing '.', a leading "x =", '\\%' and thousands separators removed;
    \\dfrac/\\tfrac -> \\frac."""
    s = _TRAILING_UNIT.sub("", answer.strip())
    for w in _WRAPPERS:
        s = _unwrap(s, w)
    for token in (
        "\\$",
        "\\left",
        "\\right",
        "\\!",
        "\\,",
        "\\;",
        "\\:",
        "\\ ",
        "$",
        "\\%",
        "%",
        "^\\circ",
        "^{\\circ}",
    ):
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = s.strip()
    s = _VAR_PREFIX.sub("", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def to_number(answer: str) -> Fraction | None:
    """Exact value of a normalized numeric answer: integers, decimals, a/b, \\frac{a}{b},
    \\frac12, signs in front; None when it is not one of those."""
    s = normalize_answer(answer)
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1]
    if _NUMBER.match(s):
        return Fraction(s)
    for pattern in (_FRAC, _FRAC_SHORT):
        m = pattern.match(s)
        if m:
            num, den = to_number(m.group(2)), to_number(m.group(3))
            if num is None or den is None or den == 0:
                return None
            value = num / den
            return -value if m.group(1) == "-" else value
    m = _SLASH.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def answers_match(predicted: str, reference: str) -> bool:
    """Numeric equality when both sides parse as numbers, else normalized string equality."""
    a, b = to_number(predicted), to_number(reference)
    if a is not None and b is not None:
        return a == b
    na, nb = normalize_answer(predicted), normalize_answer(reference)
    return bool(na) and na == nb


def last_number(text: str) -> str | None:
    """The last number written in `text` ("-12", "1,000", "3.5"), sign included; None if none.
    A trailing sentence period is not part of it."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].rstrip(",") if found else None


def has_content(boxed: str | None) -> bool:
    """A box holds an answer only if it has a letter or digit: small models echo the
    prompt's "\\boxed{}" literally, sometimes as "\\boxed{{}.}"."""
    return boxed is not None and re.search(r"[0-9A-Za-z]", boxed) is not None


def final_answer(text: str) -> str | None:
    """Last \\boxed{} content if it holds an answer, else the last number in the text."""
    boxed = last_boxed(text)
    return boxed if has_content(boxed) else last_number(text)
