"""Prompt rows for the driver: read a JSONL file, and hand out batches with a resumable position.

A row is `{"prompt": str | chat messages, "label": any, "group_id": int}`; `group_id` is a
running counter of prompts handed out, so the n samples of one prompt share it and no two
prompts of a run ever do. The stream's whole state is (epoch, position, handed-out count): with
the seed, that re-creates the shuffled order, so a resumed run sees the same prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def load_rows(path: str, input_key: str, label_key: str, limit: int = 0) -> list[dict[str, Any]]:
    """`{"prompt", "label"}` rows of a JSONL file (the first `limit` when limit > 0)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {path!r} does not exist")
    rows: list[dict[str, Any]] = []
    with open(p) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if input_key not in obj:
                raise ValueError(f"{path}:{lineno}: no key {input_key!r} (set --input-key)")
            rows.append({"prompt": obj[input_key], "label": obj.get(label_key)})
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"prompt file {path!r} has no rows")
    return rows


class PromptStream:
    """Endless batches over `rows`, reshuffled each epoch with a seed derived from (seed, epoch)."""

    def __init__(self, rows: list[dict[str, Any]], seed: int, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("PromptStream needs at least one row")
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.pos, self.handed_out = 0, 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            row = dict(self.rows[self._order[self.pos]])
            row["group_id"] = self.handed_out
            out.append(row)
            self.pos += 1
            self.handed_out += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "handed_out": self.handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.handed_out = state["epoch"], state["pos"], state["handed_out"]
        self._order = self._epoch_order(self.epoch)
