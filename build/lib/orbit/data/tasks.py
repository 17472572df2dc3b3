"""Built-in tasks that need no download: quickstart arithmetic and Countdown.

Arithmetic is the quickstart's task: "12 + 7", "45 x 3", and mixed "12 + 7 x 3" with the
usual precedence, on numbers up to two digits, the exact integer as label. The mix gives
SmolLM2-135M-Instruct (Q4_1) problems it sometimes gets right, so groups of samples disagree
and GRPO has a signal: with a calculator-style system prompt, greedy, it got about 47% of +,
12% of - (it drops the sign of negative results), 44% of x and 3% of mixed when each operand
has one or two digits with equal odds, against 19%, 3%, 3%, 3% with two-digit operands only
(32 probes each). The prompt is a chat whose system prompt asks for the bare result in a
box, which keeps greedy answers to ~10-15 tokens ("The answer is 52."); a "What is ...?"
prompt got derivations that a short token limit cuts off.
Train and test are drawn from one seeded pool of distinct expressions and split, so the
held-out set never overlaps training.

CLI: python -m orbit.data.tasks [arithmetic|countdown] --out-dir D --n-train N --n-test M --seed S
(writes D/train.jsonl and D/test.jsonl; --train-out/--test-out name the files instead).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

ARITH_OPS = ("+", "-", "x")
COUNTDOWN_OPS = ("+", "-", "x", "/")
# No placeholder in the example box: with "\\boxed{N}" the policy learned to echo "N".
ARITH_SYSTEM_PROMPT = "You are a calculator. Reply with only the resulting number, inside \\boxed{}."
ARITH_PROMPT = "{expr} ="
# Problem kinds and their odds: single ops, and 3-number mixed expressions (kept rarer: the
# model almost never gets them right, so they carry little learning signal).
# The default mix leans on what a 135M model can learn within a CPU quickstart: mostly
# one-digit operands and "+", where its greedy answers are right often enough that groups of
# samples disagree. With one- and two-digit operands at equal odds and kinds 0.3/0.3/0.25/0.15,
# 20 CPU steps moved greedy pass@1 by -3 to -4 points; with this mix, by +7 (docs/benchmarks.md).
ARITH_KINDS = (("+", 0.4), ("-", 0.2), ("x", 0.3), ("mixed", 0.1))
ONE_DIGIT_ODDS = 0.8  # each operand: 0-9 with these odds, else 10-99
COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, write an expression that equals {target}. You may use +, -, x, / "
    "and parentheses, and each number at most once. Put the expression in \\boxed{{}}, "
    "for example \\boxed{{(1 + 2) x 3}}."
)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def evaluate_chain(numbers: list[int], ops: list[str]) -> int:
    """Value of n0 op0 n1 op1 n2 ... with x binding tighter than + and - (left to right)."""
    assert len(numbers) == len(ops) + 1
    terms, signs = [numbers[0]], []
    for op, n in zip(ops, numbers[1:]):
        if op == "x":
            terms[-1] *= n
        else:
            signs.append(op)
            terms.append(n)
    total = terms[0]
    for op, t in zip(signs, terms[1:]):
        total = _apply(total, op, t)
    return total


def _operand(rng: random.Random) -> int:
    return rng.randint(0, 9) if rng.random() < ONE_DIGIT_ODDS else rng.randint(10, 99)


def arithmetic_row(rng: random.Random) -> dict[str, Any]:
    """One problem of a kind drawn from ARITH_KINDS; the prompt is a [system, user] chat."""
    kind = rng.choices([k for k, _ in ARITH_KINDS], weights=[w for _, w in ARITH_KINDS])[0]
    if kind == "mixed":
        numbers = [_operand(rng) for _ in range(3)]
        ops = [rng.choice(ARITH_OPS) for _ in range(2)]
    else:
        numbers, ops = [_operand(rng), _operand(rng)], [kind]
    expr = " ".join(
        str(numbers[0]) if i == 0 else f"{ops[i - 1]} {numbers[i]}" for i in range(len(numbers))
    )
    return {
        "prompt": [
            {"role": "system", "content": ARITH_SYSTEM_PROMPT},
            {"role": "user", "content": ARITH_PROMPT.format(expr=expr)},
        ],
        "label": evaluate_chain(numbers, ops),
        "expression": expr,
    }


def countdown_row(rng: random.Random) -> dict[str, Any]:
    """3-4 numbers in 1..99 and a target reachable with all of them (built by combining them
    in a random order with + - x and exact /), positive and at most 999."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        order = numbers[:]
        rng.shuffle(order)
        value = order[0]
        for n in order[1:]:
            op = rng.choice(COUNTDOWN_OPS)
            if op == "/":
                if value % n:
                    op = "+"
                else:
                    value //= n
                    continue
            value = _apply(value, op, n)
        if 1 <= value <= 999:
            key = f"{sorted(numbers)}->{value}"
            prompt = COUNTDOWN_PROMPT.format(numbers=numbers, target=value)
            return {
                "prompt": prompt,
                "label": {"numbers": numbers, "target": value},
                "expression": key,
            }


TASKS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "arithmetic": arithmetic_row,
    "countdown": countdown_row,
}


def generate_split(
    task: str, n_train: int, n_test: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distinct problems (by expression), shuffled by `seed`, split into train and test."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    rng = random.Random(seed)
    make = TASKS[task]
    want = n_train + n_test
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < want:
        attempts += 1
        if attempts > 50 * want + 1000:
            raise ValueError(f"could not draw {want} distinct {task} problems; ask for fewer")
        row = make(rng)
        if row["expression"] in seen:
            continue
        seen.add(row["expression"])
        rows.append(row)
    # Split a shuffled pool, not the draw order: the common problems (one-digit pairs, ~300 of
    # them) are drawn early and run out, so the tail of the draw order holds almost none; a
    # tail test set would be harder than the train set it is meant to mirror.
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m orbit.data.tasks", description=__doc__.splitlines()[0]
    )
    parser.add_argument("task", nargs="?", default="arithmetic", choices=sorted(TASKS))
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="write train.jsonl and test.jsonl here"
    )
    parser.add_argument(
        "--train-out", type=Path, default=None, help="train JSONL path (overrides --out-dir)"
    )
    parser.add_argument(
        "--test-out", type=Path, default=None, help="test JSONL path (overrides --out-dir)"
    )
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    train_out = args.train_out or (args.out_dir / "train.jsonl" if args.out_dir else None)
    test_out = args.test_out or (args.out_dir / "test.jsonl" if args.out_dir else None)
    if train_out is None or test_out is None:
        parser.error("give --out-dir, or both --train-out and --test-out")
    train, test = generate_split(args.task, args.n_train, args.n_test, args.seed)
    write_jsonl(train, train_out)
    write_jsonl(test, test_out)
    print(f"{args.task}: wrote {len(train)} rows to {train_out} and {len(test)} rows to {test_out}")


if __name__ == "__main__":
    main()
