"""`python -m orbit.entrypoints.generate`: sample completions with the native engine.

A demo and a smoke test of the rollout path in one command: load a model (by default the
embedded SmolLM2-135M-Instruct Q4_1 GGUF), render each prompt with the tokenizer's chat
template, generate, print the completions and the engine's tokens/s.

Prompt file: one prompt per line (.txt), or JSONL with a "prompt" string or a "messages"
list per line.

    python -m orbit.entrypoints.generate --prompts prompts.txt --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def read_prompts(path: str | Path) -> list[list[dict[str, str]]]:
    """Chat message lists, one per prompt in the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {p}: no such file")
    out: list[list[dict[str, str]]] = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            row = json.loads(line)
            if "messages" in row:
                out.append(list(row["messages"]))
            elif "prompt" in row:
                out.append([{"role": "user", "content": str(row["prompt"])}])
            else:
                raise ValueError(f"{p}:{i}: a JSONL prompt needs a 'prompt' or 'messages' field")
        else:
            out.append([{"role": "user", "content": line}])
    if not out:
        raise ValueError(f"--prompts {p}: no prompts in the file")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orbit generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl prompt file")
    ap.add_argument("--model", default=None, help="HF model dir or .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("-n", "--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--no-chat-template", action="store_true", help="tokenize the raw prompt text")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=_DTYPES, default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--jsonl", action="store_true", help="print one JSON object per completion")
    return ap


def _prompt_ids(tok: Any, messages: list[dict[str, str]], raw: bool) -> list[int]:
    from orbit.models.tokenizer import chat_prompt_ids

    if raw or not getattr(tok, "chat_template", None):
        return list(tok(messages[-1]["content"])["input_ids"])
    return chat_prompt_ids(tok, messages)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from orbit.assets import default_gguf_path
    from orbit.models.loader import load_model
    from orbit.models.tokenizer import stop_token_ids
    from orbit.rollout.engine import Engine
    from orbit.rollout.types import SamplingParams

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    model_path = args.model or default_gguf_path()
    chats = read_prompts(args.prompts)
    model, tok = load_model(model_path, dtype=dtype, device=device)
    if tok is None:
        raise ValueError(f"{model_path} ships no tokenizer; the demo needs one")
    model.requires_grad_(False)
    prompts = [_prompt_ids(tok, m, args.no_chat_template) for m in chats]
    engine = Engine(
        model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, device=device,
        cuda_graph=not args.no_cuda_graph, tokenizer=tok,
        eos_token_ids=stop_token_ids(tok, model.config.eos_token_ids),
    )
    sp = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_new_tokens=args.max_new_tokens, stop_strings=tuple(args.stop), seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    out = engine.generate(prompts, sp, n=args.n)
    for i, (chat, row) in enumerate(zip(chats, out)):
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
        f"({st['prefill_steps']} prefill + {st['decode_steps']} decode steps, {device}, {dtype})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
