"""Tokenizers for HF directories and GGUF files, through transformers' own loaders.

Orbit does not reimplement tokenization: a HF directory's tokenizer files or a GGUF file's
embedded vocabulary (`tokenizer.ggml.*` metadata, converted by transformers) give a
`PreTrainedTokenizerFast`, chat template included. The helpers here are the two calls the
rest of Orbit needs: prompt ids from chat messages, and the stop tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: str | Path) -> Any | None:
    """Tokenizer of a HF model directory or `.gguf` file; None if a directory has no tokenizer
    files (e.g. a tiny random test model)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"GGUF file {p} does not exist")
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(p))


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass raw prompt text instead")
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def stop_token_ids(tokenizer: Any, config_eos: list[int] | None = None) -> list[int]:
    """EOS ids to stop generation on: the model config's, plus the tokenizer's own EOS."""
    ids = list(config_eos or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos not in ids:
        ids.append(eos)
    return ids
