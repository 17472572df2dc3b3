"""A tiny random Llama with a character-level tokenizer and chat template, saved to a directory.

Trainer, orchestration and launcher tests need a *real* checkpoint directory that
`orbit.models.loader.load_model` reads (config.json + safetensors + tokenizer files), small
enough that a whole RL step runs on a CPU in about a second.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_policy(path: str | Path, seed: int = 0, layers: int = 2, hidden: int = 32) -> Path:
    """Write the tiny model + tokenizer to `path` (returned)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    specials = ["<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>",
                                   additional_special_tokens=specials[2:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=hidden // 4, max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=vocab["<|end|>"], bos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def write_arithmetic_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """`n` rows of {"prompt": "a+b=", "label": a+b} (rewards come from the arithmetic verifier)."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "label": a + b}) + "\n")
    return path


def digit_reward(sample: Any) -> float:  # an orbit.data.Sample
    """A reward a random character-level model earns about half the time (any digit in the
    response), so advantages are non-zero and tests see real updates."""
    return float(any(ch.isdigit() for ch in sample.response_text))


TINY_REWARD = f"{__file__}:digit_reward"
