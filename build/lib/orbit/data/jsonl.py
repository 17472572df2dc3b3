"""Prompt datasets from JSONL files, and a seeded, resumable epoch iterator over them.

Each line is a JSON object with an input field (a string prompt, or a chat as a list of
{"role", "content"} messages) and optionally a label field. Rendering to the text the engine
tokenizes happens here: with the chat template on, the tokenizer's own template is applied
(`apply_chat_template(..., add_generation_prompt=True, tokenize=False)`), so prompts match
what the model saw in its instruction tuning. Bad rows fail loudly with file:line and field,
or are counted and skipped when the user asks for that.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("orbit.data")


@dataclass(frozen=True)
class PromptRecord:
    text: str  # what the engine tokenizes (chat template already applied if on)
    label: Any  # the label field's value (None when no label key)
    messages: (
        list[dict[str, str]] | None
    )  # the chat, when the row was one or a template was applied
    source: str  # "file:line"
    row: int  # position among the loaded rows (before shuffling)
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's other fields


@dataclass
class PromptDataset:
    records: list[PromptRecord]
    skipped_rows: int = 0  # bad rows dropped under skip_bad_rows=True

    def __len__(self) -> int:
        return len(self.records)


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {key!r} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f"{where}: field {key!r}[{i}] must be an object with string 'role' and 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_template(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError("apply_chat_template=True needs a tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"apply_chat_template=True but the tokenizer ({type(tokenizer).__name__}) has no "
            "chat_template; turn the chat template off for this model"
        )


def render_prompt(
    prompt: str | list[dict[str, str]],
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
) -> tuple[str, list[dict[str, str]] | None]:
    """-> (text, messages). Template on: the row's chat (or [user: prompt]) with the system
    prompt prepended unless the chat already starts with one. Template off: a string prompt
    is used as is (system prompt + blank line in front); a chat is an error there."""
    if apply_chat_template:
        _check_template(tokenizer)
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        )
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text, messages
    if not isinstance(prompt, str):
        raise ValueError("a message-list prompt needs apply_chat_template=True")
    return (f"{system_prompt}\n\n{prompt}" if system_prompt else prompt), None


def load_prompts(
    path: str | Path,
    input_key: str = "prompt",
    label_key: str | None = "label",
    tokenizer: Any = None,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    limit: int | None = None,
    skip_bad_rows: bool = False,
) -> PromptDataset:
    """Read a JSONL prompt file (blank lines ignored); `limit` keeps the first N good rows.

    A bad row (invalid JSON, not an object, missing input/label field, wrong type) raises
    ValueError("<file>:<line>: ... field ..."), or with skip_bad_rows=True is logged, skipped
    and counted in `skipped_rows`."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {p} does not exist")
    if apply_chat_template:
        _check_template(tokenizer)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records: list[PromptRecord] = []
    skipped = 0
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                records.append(
                    _parse_row(
                        line,
                        where,
                        len(records),
                        input_key,
                        label_key,
                        tokenizer,
                        apply_chat_template,
                        system_prompt,
                    )
                )
            except ValueError as e:
                if not skip_bad_rows:
                    raise
                skipped += 1
                log.warning("skipping bad prompt row: %s", e)
    return PromptDataset(records=records, skipped_rows=skipped)


def _parse_row(
    line: str,
    where: str,
    row: int,
    input_key: str,
    label_key: str | None,
    tokenizer: Any,
    apply_chat_template: bool,
    system_prompt: str | None,
) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: row must be a JSON object, got {type(obj).__name__}")
    if input_key not in obj:
        raise ValueError(f"{where}: missing field {input_key!r}")
    raw = obj[input_key]
    prompt: str | list[dict[str, str]] = (
        raw if isinstance(raw, str) else _messages(raw, where, input_key)
    )
    if label_key is not None and label_key not in obj:
        raise ValueError(f"{where}: missing field {label_key!r}")
    try:
        text, messages = render_prompt(prompt, tokenizer, apply_chat_template, system_prompt)
    except ValueError as e:
        raise ValueError(f"{where}: field {input_key!r}: {e}") from e
    if messages is None and not isinstance(prompt, str):
        messages = prompt
    meta = {k: v for k, v in obj.items() if k not in (input_key, label_key)}
    label = obj[label_key] if label_key is not None else None
    return PromptRecord(
        text=text, label=label, messages=messages, source=where, row=row, metadata=meta
    )


class PromptIterator:
    """Endless batches over a dataset, epoch after epoch; each epoch is a fresh permutation
    seeded by (seed, epoch), so a run resumed from `state_dict()` sees exactly the batches
    the uninterrupted run would have. A batch that crosses an epoch boundary is completed
    from the next epoch."""

    def __init__(
        self, dataset: PromptDataset, batch_size: int, seed: int = 0, shuffle: bool = True
    ) -> None:
        if len(dataset) == 0:
            raise ValueError("PromptIterator: the dataset has no rows")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # A string seed hashes deterministically across processes (unlike hash() of a tuple).
            random.Random(f"orbit-prompts-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[PromptRecord]:
        out: list[PromptRecord] = []
        while len(out) < self.batch_size:
            if self.offset >= len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), len(self._order) - self.offset)
            out.extend(
                self.dataset.records[i] for i in self._order[self.offset : self.offset + take]
            )
            self.offset += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "offset", "seed"} - set(state)
        if missing:
            raise ValueError(f"PromptIterator state is missing {sorted(missing)}")
        if not 0 <= state["offset"] <= len(self.dataset):
            raise ValueError(
                f"PromptIterator state offset {state['offset']} outside [0, {len(self.dataset)}]"
            )
        self.seed, self.epoch, self.offset = (
            int(state["seed"]),
            int(state["epoch"]),
            int(state["offset"]),
        )
        self._order = self._permutation(self.epoch)
