"""The generate demo CLI's prompt-file parsing (the model run itself is a GPU/demo concern)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orbit.entrypoints.generate import build_parser, read_prompts


def test_read_prompts_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("What is 2+3?\n\nName a color.\n")
    assert read_prompts(txt) == [[{"role": "user", "content": "What is 2+3?"}],
                                 [{"role": "user", "content": "Name a color."}]]
    jl = tmp_path / "p.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    jl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"messages": msgs}) + "\n")
    assert read_prompts(jl) == [[{"role": "user", "content": "a"}], msgs]


def test_read_prompts_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(empty)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl:1: .*'prompt' or 'messages'"):
        read_prompts(bad)


def test_parser_defaults() -> None:
    a = build_parser().parse_args(["--prompts", "x.txt", "--max-new-tokens", "8", "--stop", "\n\n", "-n", "3"])
    assert a.max_new_tokens == 8 and a.stop == ["\n\n"] and a.n == 3 and a.model is None
