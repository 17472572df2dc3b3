"""JSONL prompt loading: keys, chats, chat template, bad rows, seeded order and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from orbit.data.jsonl import PromptDataset, PromptIterator, PromptRecord, load_prompts

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok)
    out.chat_template = TEMPLATE
    return out


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_string_and_chat_rows_with_template(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    chat = [{"role": "system", "content": "own sys"}, {"role": "user", "content": "2+2?"}]
    f = _write(
        tmp_path / "p.jsonl",
        [
            json.dumps({"question": "1+1?", "answer": 2, "source": "a"}),
            "",
            json.dumps({"question": chat, "answer": "4"}),
        ],
    )
    ds = load_prompts(
        f,
        input_key="question",
        label_key="answer",
        tokenizer=tokenizer,
        apply_chat_template=True,
        system_prompt="Be brief.",
    )
    assert len(ds) == 2 and ds.skipped_rows == 0
    r0, r1 = ds.records
    assert r0.text == "<|system|>Be brief.\n<|user|>1+1?\n<|assistant|>"
    assert r0.label == 2 and r0.metadata == {"source": "a"} and r0.source == f"{f}:1"
    # the row's own system message wins over --system-prompt
    assert r1.text == "<|system|>own sys\n<|user|>2+2?\n<|assistant|>"
    assert r1.messages == chat and r1.source == f"{f}:3" and r1.row == 1


def test_template_off(tmp_path: Path) -> None:
    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "1+1?", "label": 2})])
    assert load_prompts(f).records[0].text == "1+1?"
    assert load_prompts(f, system_prompt="S").records[0].text == "S\n\n1+1?"
    assert load_prompts(f, label_key=None).records[0].label is None
    chat = _write(
        tmp_path / "c.jsonl",
        [json.dumps({"prompt": [{"role": "user", "content": "x"}], "label": 1})],
    )
    with pytest.raises(ValueError, match=r"c.jsonl:1: field 'prompt': .*apply_chat_template"):
        load_prompts(chat)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        load_prompts(f, apply_chat_template=True)


def test_tokenizer_without_template_is_a_clear_error(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "1+1?", "label": 2})])
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        load_prompts(f, tokenizer=tokenizer, apply_chat_template=True, skip_bad_rows=True)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad.jsonl:2: invalid JSON"),
        ("[1, 2]", r"bad.jsonl:2: row must be a JSON object"),
        ('{"label": 1}', r"bad.jsonl:2: missing field 'prompt'"),
        ('{"prompt": "q"}', r"bad.jsonl:2: missing field 'label'"),
        (
            '{"prompt": 5, "label": 1}',
            r"bad.jsonl:2: field 'prompt' must be a string or a non-empty list",
        ),
        (
            '{"prompt": [{"role": "user"}], "label": 1}',
            r"bad.jsonl:2: field 'prompt'\[0\] must be an object",
        ),
    ],
)
def test_bad_row_names_file_line_field(tmp_path: Path, line: str, message: str) -> None:
    f = _write(
        tmp_path / "bad.jsonl",
        [json.dumps({"prompt": "ok", "label": 0}), line, '{"prompt": "z", "label": 3}'],
    )
    with pytest.raises(ValueError, match=message):
        load_prompts(f)
    ds = load_prompts(f, skip_bad_rows=True)
    assert ds.skipped_rows == 1 and [r.label for r in ds.records] == [0, 3]


def test_limit_and_missing_file(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "p.jsonl",
        [json.dumps({"prompt": str(i), "label": i}) for i in range(10)] + ["{broken"],
    )
    ds = load_prompts(f, limit=4)  # stops before the broken last line
    assert [r.label for r in ds.records] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def _dataset(n: int) -> PromptDataset:
    return PromptDataset(
        [
            PromptRecord(text=str(i), label=i, messages=None, source=f"f:{i}", row=i)
            for i in range(n)
        ]
    )


def _labels(batch: list[PromptRecord]) -> list[int]:
    return [r.label for r in batch]


def test_seeded_shuffle_epochs_and_resume() -> None:
    ds = _dataset(10)
    a = PromptIterator(ds, batch_size=4, seed=3)
    b = PromptIterator(ds, batch_size=4, seed=3)
    run_a = [_labels(a.next_batch()) for _ in range(6)]  # 24 rows = 2.4 epochs
    assert run_a == [_labels(b.next_batch()) for _ in range(6)]
    epoch0 = run_a[0] + run_a[1] + run_a[2][:2]
    epoch1 = run_a[2][2:] + run_a[3] + run_a[4]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1  # a new permutation each epoch
    assert epoch0 != list(range(10))
    assert a.state_dict() == {"epoch": 2, "offset": 4, "seed": 3}
    assert _labels(PromptIterator(ds, 4, seed=4).next_batch()) != run_a[0]

    # resume mid-epoch from a saved state: the same batches follow
    c = PromptIterator(ds, batch_size=4, seed=3)
    for _ in range(3):
        c.next_batch()
    state = json.loads(json.dumps(c.state_dict()))
    d = PromptIterator(ds, batch_size=4, seed=0)
    d.load_state_dict(state)
    assert [_labels(d.next_batch()) for _ in range(3)] == run_a[3:]
    with pytest.raises(ValueError, match="missing"):
        d.load_state_dict({"epoch": 0})


def test_no_shuffle_is_file_order() -> None:
    it = PromptIterator(_dataset(3), batch_size=2, shuffle=False)
    assert [_labels(it.next_batch()) for _ in range(3)] == [[0, 1], [2, 0], [1, 2]]
