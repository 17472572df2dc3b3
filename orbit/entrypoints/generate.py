"""`python -m orbit.entrypoints.generate`: sample completions with the native engine.

A demo and a smoke test of the rollout path in one command: load a model (by default the
embedded SmolLM2-135M-Instruct Q4_1 GGUF), render each prompt with the tokenizer's chat
template, generate, print the completions and the engine's tokens/s.

Prompt file: one prompt per line (.txt), or JSONL with a "prompt" string or a "messages"
list per line. Bad flags or a bad prompt file: one line on stderr ("<file>:<line>: ..." for a
JSONL row), exit status 2. A prompt the engine refuses (longer than --max-model-len) is
reported on stderr and the others still run (exit status 1).

    python -m orbit.entrypoints.generate --prompts prompts.txt --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

_DTYPES = ("float32", "bfloat16", "float16")
PROG = "orbit generate"


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Chat message lists, one per prompt in the file.

    A bad JSONL row raises ValueError("<file>:<line>: <what is wrong>"); no row is skipped
    silently (blank lines are not rows)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    jsonl = p.suffix.lower() == ".jsonl"
    out: list[list[dict[str, str]]] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            out.append(_jsonl_row(line, f"{p}:{i}"))
        else:
            out.append([{"role": "user", "content": line}])
    if not out:
        raise ValueError(f"--prompts {p}: no prompts in the file")
    return out


def _jsonl_row(line: str, where: str) -> list[dict[str, str]]:
    """One JSONL row -> its chat messages; `where` is "<file>:<line>" for the errors."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(  # noqa: TRY004 (main reports ValueErrors as bad input, exit 2)
            f"{where}: a JSONL prompt must be an object with a 'prompt' or 'messages' field, "
            f"got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{role, content}} objects, got {msgs!r:.60}")
        for k, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(  # noqa: TRY004 (as above)
                    f"{where}: 'messages'[{k}] must be an object with string 'role' and "
                    f"'content', got {m!r:.60}")
        return [dict(m) for m in msgs]
    if "prompt" in row:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {row['prompt']!r:.60}")
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError(f"{where}: a JSONL prompt needs a 'prompt' or 'messages' field "
                     f"(the row has {sorted(row)})")


def _number(kind: type, lo: float, hi: float = math.inf, lo_open: bool = False,
            what: str = "") -> Callable[[str], Any]:
    """An argparse type: `kind` (int or float) in [lo, hi] ((lo, hi] when lo_open), finite.
    argparse turns the ArgumentTypeError into "argument --flag: <message>"."""
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return v
    return parse


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ("orbit generate: error: ...", exit 2), not the whole usage
    block, so the message is what the user sees."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl prompt file")
    ap.add_argument("--model", default=None, help="HF model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", default=None,
                    help="a PEFT adapter dir (LoRA or OFT, e.g. a run's checkpoints/step_000048/"
                         "adapter; the checkpoint dir itself works too) served on the base")
    ap.add_argument("--max-new-tokens", type=_number(int, 1, what="an int >= 1"), default=128)
    ap.add_argument("-n", "--n", type=_number(int, 1, what="an int >= 1"), default=1, help="samples per prompt")
    ap.add_argument("--temperature", type=_number(float, 0.0, what="a finite number >= 0"), default=0.7)
    ap.add_argument("--top-p", type=_number(float, 0.0, 1.0, lo_open=True, what="in (0, 1]"), default=1.0)
    ap.add_argument("--top-k", type=_number(int, -1, what="an int >= -1 (0 or -1 = off)"), default=0)
    ap.add_argument("--min-p", type=_number(float, 0.0, 1.0, what="in [0, 1]"), default=0.0)
    ap.add_argument("--seed", type=_number(int, 0, what="an int >= 0"), default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--no-chat-template", action="store_true", help="tokenize the raw prompt text")
    ap.add_argument("--max-num-seqs", type=_number(int, 1, what="an int >= 1"), default=64)
    ap.add_argument("--max-model-len", type=_number(int, 2, what="an int >= 2"), default=2048)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=_DTYPES, default=None, help="default: bfloat16 on cuda and on a CPU with native bf16 dot products (AVX-512 BF16, AMX), else float32")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--qmm-routes", default="", help="route table from `python -m orbit "
                    "tune-qmm` (quantized-matmul kernel per shape on this GPU)")
    ap.add_argument("--jsonl", action="store_true", help="print one JSON object per completion")
    return ap


def _prompt_ids(tok: Any, messages: list[dict[str, str]], raw: bool) -> list[int]:
    from orbit.models.tokenizer import chat_prompt_ids

    if raw or not getattr(tok, "chat_template", None):
        return list(tok(messages[-1]["content"])["input_ids"])
    return chat_prompt_ids(tok, messages)


def main(argv: list[str] | None = None) -> int:
    """0: every prompt ran; 1: some prompt failed in the engine (the others are printed);
    2: bad arguments or prompt file, one line on stderr, nothing run."""
    args = build_parser().parse_args(argv)
    try:
        sp, chats, prompts, engine = _setup(args)
    except ValueError as e:  # bad input, said in one line; an error while sampling is a bug: traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # "skip": a prompt longer than --max-model-len fails alone; the others still run.
    out = engine.generate(prompts, sp, n=args.n, on_error="skip")
    failed = 0
    for i, (chat, row) in enumerate(zip(chats, out)):
        if row[0].finish_reason == "error":  # every sample of a refused prompt is an error
            failed += 1
            msg = str(row[0].error).removeprefix(f"request {i}: ")
            print(f"{PROG}: prompt {i} not run: {msg}", file=sys.stderr)
            if args.jsonl:
                print(json.dumps({"prompt": i, "error": msg, "finish_reason": "error"}))
            continue
        for j, c in enumerate(row):
            if args.jsonl:
                print(json.dumps({"prompt": i, "sample": j, "text": c.text, "tokens": c.tokens,
                                  "logprobs": c.logprobs, "finish_reason": c.finish_reason}))
            else:
                print(f"=== prompt {i} sample {j} ({len(c.tokens)} tokens, {c.finish_reason}) ===")
                print(f"> {chat[-1]['content']}")
                print(c.text)
    st = engine.last_stats
    print(
        f"{st['new_tokens']} tokens in {st['seconds']:.2f} s = {st['tokens_per_s']:.1f} tokens/s "
        f"({st['prefill_steps']} prefill + {st['decode_steps']} decode steps, {engine.device}, "
        f"{engine.model_dtype}, KV cache {engine.dtype})",
        file=sys.stderr,
    )
    if failed:
        print(f"{PROG}: {failed} of {len(chats)} prompts not run (see above)", file=sys.stderr)
    return 1 if failed else 0


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def _adapter_dir(name: str) -> Path:
    """The PEFT dir --adapter names: the dir itself, or an Orbit checkpoint's `adapter/`."""
    from orbit.adapters.peft_io import CONFIG_NAME

    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"--adapter {name}: no such directory")
    if not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    return path


def _setup(args: argparse.Namespace) -> tuple[Any, list[list[dict[str, str]]], list[list[int]], Any]:
    """(SamplingParams, chats, prompt ids, Engine); ValueError for any bad input."""
    import torch

    from orbit.assets import default_gguf_path
    from orbit.models.dtypes import auto_compute_dtype
    from orbit.models.loader import load_model
    from orbit.models.tokenizer import stop_token_ids
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    # Everything the user typed is checked before the (slow) model load.
    sp = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop), seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    sp.check()
    device = _device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else auto_compute_dtype(device)
    chats = read_prompts(args.prompts)
    model_path = args.model or default_gguf_path()
    if args.model is not None and not Path(model_path).exists():
        raise ValueError(f"--model {model_path}: no such file or directory")
    adapter = _adapter_dir(args.adapter) if args.adapter is not None else None
    from orbit.kernels.qmm_routes import install_from_path

    try:
        install_from_path(args.qmm_routes)
    except ValueError as e:  # RouteTableError: names the file, the entry and the field
        raise ValueError(f"--qmm-routes: {e}") from None
    model, tok = load_model(model_path, dtype=dtype, device=device)
    if tok is None:
        raise ValueError(f"{model_path} ships no tokenizer; the demo needs one")
    model.requires_grad_(False)
    if adapter is not None:
        from orbit.adapters.peft_io import serve_peft

        try:
            serve_peft(model, adapter, dtype=dtype)  # the serve slot, active
        except ValueError as e:
            raise ValueError(f"--adapter {adapter}: {e}") from None
    prompts = [_prompt_ids(tok, m, args.no_chat_template) for m in chats]
    engine = Engine(
        model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, device=device,
        cuda_graph=not args.no_cuda_graph, tokenizer=tok,
        eos_token_ids=stop_token_ids(tok, model.config.eos_token_ids),
    )
    return sp, chats, prompts, engine


if __name__ == "__main__":
    sys.exit(main())
