"""Build a `CausalLM` from a llama.cpp GGUF file, keeping its quantized weights exact.

The config comes from the GGUF metadata (`llama.*` keys), the weights from orbit.quant.gguf:
Q4_0/Q4_1 linears become exact int4 `QuantLinear`s, Q8_0 exact int8. Two deliberate
exceptions:
- `token_embd` (Q8_0 in SmolLM2) is an embedding *lookup*, not a matmul, and is tied to the
  output head: it is dequantized once to a dense float tensor of `dtype` (exact in float32:
  d * q of an fp16 and an int8 fits in a float32 mantissa; rounded in bf16).
- llama.cpp stores Llama Q/K rows permuted for its interleaved RoPE; the permutation moves
  whole rows, and blocks run along the input dim, so rows are put back (with their scales)
  without requantizing.
Only the `llama` GGUF architecture (Llama, SmolLM2, Mistral-style dense models) is read.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from orbit.models.config import ModelConfig
from orbit.models.loader import materialize
from orbit.models.transformer import CausalLM

# GGUF tensor name -> HF parameter name (without ".weight").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight` (None if unknown)."""
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader: Any, tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from `llama.*` metadata; ValueError naming what is missing or unsupported."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture {arch!r} is not supported (Orbit reads 'llama')")

    def need(key: str) -> Any:
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata key 'llama.{key}' is missing")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    scaling = None
    stype = _field(reader, "llama.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise ValueError(f"GGUF llama.rope.scaling.type {stype!r} is not supported (only 'linear')")
        scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF tensor 'rope_freqs.weight' (baked Llama-3 RoPE scaling) is not supported")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens") or [])
    head_dim = _field(reader, "llama.attention.key_length") or hidden // heads
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF llama.rope.dimension_count != head_dim (partial RoPE) is not supported")
    return ModelConfig(
        arch="LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(need("context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    keep_quantized: bool = True,
    fallback_fmt: str = "int8",
    fallback_group_size: int | None = None,
) -> CausalLM:
    """GGUF file -> frozen `CausalLM`. Q4_0/Q4_1/Q8_0 linears keep their exact values (int4 /
    int8, group 32); any other quantized type is dequantized and requantized to `fallback_fmt`
    (`fallback_group_size`, default: the largest of 128/64/32 dividing the width), with a
    warning naming the tensor and type. With `keep_quantized=False` every linear is dequantized
    to a dense `nn.Linear` of `dtype` instead (for comparisons; same values)."""
    from orbit.quant.gguf import (
        GGUFReader,
        gguf_float,
        gguf_qweight,
        llama_rope_unpermutation,
    )

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {path} does not exist")
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(reader, set(tensors))
    by_hf = {}
    for gname, t in tensors.items():
        name = hf_name(gname)
        if name is None:
            raise ValueError(f"{path}: GGUF tensor {gname!r} has no place in a Llama model")
        by_hf[name] = t
    if config.tie_word_embeddings:
        by_hf.pop("lm_head.weight", None)

    def perm_for(name: str) -> Tensor | None:
        if name.endswith("self_attn.q_proj"):
            return llama_rope_unpermutation(config.num_heads * config.head_dim, config.num_heads)
        if name.endswith("self_attn.k_proj"):
            return llama_rope_unpermutation(config.num_kv_heads * config.head_dim, config.num_kv_heads)
        return None

    def read(name: str) -> Tensor | None:
        t = by_hf.get(name)
        if t is None:
            return None
        try:
            w = gguf_float(t)  # float32, exact for F32/F16/Q8_0/Q4_x values
        except ValueError as e:  # names tensor and type; add which file
            raise ValueError(f"{path}: {e}") from e
        perm = perm_for(name.rpartition(".")[0])
        return w[perm] if perm is not None else w

    def read_linear(name: str) -> nn.Module | None:
        t = by_hf.get(name + ".weight")
        if not keep_quantized or t is None or name == "lm_head":
            return None  # dense path (or a missing tensor, reported by materialize)
        from orbit.quant.linear import QuantLinear

        try:  # q/k rows back from llama.cpp's RoPE layout (before any requantization)
            qw = gguf_qweight(t, fallback_fmt, fallback_group_size, row_perm=perm_for(name))
        except ValueError as e:  # names tensor and type; add which file
            raise ValueError(f"{path}: {e}") from e
        if qw.fmt == "bf16":  # a float GGUF linear: keep it a plain dense linear
            return None
        return QuantLinear(qw, None)

    with torch.device("meta"):
        model = CausalLM(config)
    materialize(model, read, dtype, device, where=str(path), read_linear=read_linear)
    return model.eval()
