"""The generate demo on bad input: one line on stderr and exit status 2 (no traceback), a bad
JSONL row named by <file>:<line>, and a prompt the engine refuses fails alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tiny_policy import save_tiny_policy

from orbit.entrypoints.generate import main, read_prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_policy(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "p.txt"
    p.write_text("1+2=\n3+4=\n")
    return p


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a"', r"p.jsonl:2: invalid JSON \(.* at column \d+\)"),
    ('["a", "b"]', r"p.jsonl:2: a JSONL prompt must be an object .*got list"),
    ('"prompt"', r"p.jsonl:2: a JSONL prompt must be an object .*got str"),
    ('{"prompt": null}', r"p.jsonl:2: 'prompt' must be a non-empty string, got None"),
    ('{"prompt": 7}', r"p.jsonl:2: 'prompt' must be a non-empty string, got 7"),
    ('{"prompt": "  "}', r"p.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"messages": []}', r"p.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": "hi"}', r"p.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', r"p.jsonl:2: 'messages'\[0\] must be an object with string 'role' and 'content'"),
    ('{"text": "x", "label": 1}', (r"p.jsonl:2: a JSONL prompt needs a 'prompt' or 'messages' "
                                   r"field \(the row has \['label', 'text'\]\)")),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        read_prompts(p)


def test_jsonl_suffix_is_case_insensitive_and_non_utf8_is_named(tmp_path: Path) -> None:
    p = tmp_path / "P.JSONL"
    p.write_text(json.dumps({"prompt": "a"}) + "\n")
    assert read_prompts(p) == [[{"role": "user", "content": "a"}]]
    b = tmp_path / "b.txt"
    b.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"b.txt: not UTF-8 text \(byte 3"):
        read_prompts(b)


@pytest.mark.parametrize("flags, match", [
    (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0, got '-1'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got 'nan'"),
    (["--temperature", "hot"], "argument --temperature: expected a number, got 'hot'"),
    (["--top-p", "0"], r"argument --top-p: must be in \(0, 1\], got '0'"),
    (["--top-p", "inf"], r"argument --top-p: must be in \(0, 1\], got 'inf'"),
    (["--min-p", "1.5"], r"argument --min-p: must be in \[0, 1\], got '1.5'"),
    (["--top-k", "-2"], "argument --top-k: must be an int >= -1"),
    (["-n", "0"], "argument -n/--n: must be an int >= 1, got '0'"),
    (["--max-new-tokens", "2.5"], "argument --max-new-tokens: expected an int, got '2.5'"),
    (["--seed", "-3"], "argument --seed: must be an int >= 0, got '-3'"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: must be an int >= 1, got '0'"),
    (["--max-model-len", "1"], "argument --max-model-len: must be an int >= 2, got '1'"),
])
def test_bad_flag_values_are_one_line_exit_2(prompts: Path, capsys, flags: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--prompts", str(prompts), *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("orbit generate: error: "), err
    assert re.search(match, err), err


def test_bad_inputs_found_before_the_model_load_are_one_line_exit_2(tmp_path: Path, prompts: Path,
                                                                    capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"question": "b"}) + "\n")
    cases = [
        (["--prompts", str(bad)], (f"orbit generate: error: {bad}:3: a JSONL prompt needs a "
                                   "'prompt' or 'messages' field (the row has ['question'])")),
        (["--prompts", str(tmp_path / "none.txt")], "no such file"),
        (["--prompts", str(prompts), "--stop", ""], "stop_strings must be non-empty strings, got ''"),
        (["--prompts", str(prompts), "--device", "gpu"], "--device 'gpu' is not a torch device"),
        (["--prompts", str(prompts), "--model", str(tmp_path / "nope")], "no such file or directory"),
    ]
    for argv, want in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err and "Traceback" not in err, (argv, err)


def test_engine_limits_are_one_line_exit_2(model_dir, prompts: Path, capsys) -> None:
    rc = main(["--prompts", str(prompts), "--model", str(model_dir), "--max-model-len", "100000"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "exceeds the model's max_position_embeddings" in err


def test_over_long_prompt_fails_alone(model_dir, tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.txt"
    p.write_text("1+2=\n" + "9" * 40 + "\n3+4=\n")
    rc = main(["--prompts", str(p), "--model", str(model_dir), "--max-model-len", "32",
               "--max-new-tokens", "3", "--jsonl", "--seed", "0", "--no-chat-template"])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert rc == 1
    assert [r["prompt"] for r in rows] == [0, 1, 2]
    assert rows[1] == {"prompt": 1, "error": rows[1]["error"], "finish_reason": "error"}
    assert rows[1]["error"].startswith("prompt has 4")
    assert rows[0]["finish_reason"] in ("stop", "length") and rows[2]["tokens"]
    assert "orbit generate: prompt 1 not run: prompt has 4" in out.err
    assert "1 of 3 prompts not run" in out.err
