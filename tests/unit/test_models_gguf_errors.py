"""load_gguf on tiny Llama GGUF files written with gguf-py: a K-quant-style file with 576-wide
rows (SmolLM2's hidden size) loads through the requantize fallback, and bad files (a type
gguf-py cannot dequantize, truncated data) fail with errors naming file, tensor and type."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from orbit.models.attention import AttnBatch, cu_seqlens_from_lengths
from orbit.models.gguf_loader import load_gguf
from orbit.models.loader import load_model
from orbit.quant.gguf import GGUFReader, llama_rope_unpermutation
from orbit.quant.linear import QuantLinear

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 576, 9, 3, 64, 16  # SmolLM2-135M widths, one layer
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # GGUF name -> torch shape [out, in]
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}
Q = GGMLQuantizationType


def write_tiny_llama(path: Path, kind: Q, raw: dict[str, Q] | None = None) -> None:
    """A one-layer Llama GGUF with every linear in `kind`; `raw` names linears written as zero
    blocks of a type gguf-py cannot quantize (e.g. {"ffn_up": Q8_1})."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_vocab_size(VOCAB)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_block_count(1)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor(
        "token_embd.weight", (rng.standard_normal((VOCAB, HIDDEN)) * 0.1).astype(np.float32)
    )
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for name, (out_f, in_f) in LINEARS.items():
        gname = f"blk.0.{name}.weight"
        if raw and name in raw:
            block, type_size = GGML_QUANT_SIZES[raw[name]]
            w.add_tensor(
                gname, np.zeros((out_f, in_f // block * type_size), np.uint8), raw_dtype=raw[name]
            )
            continue
        arr = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
        w.add_tensor(gname, quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_k_quant_style_576_wide_file_loads_with_groups_that_divide(tmp_path: Path) -> None:
    path = tmp_path / "tiny-q5_0.gguf"
    write_tiny_llama(path, Q.Q5_0)
    with pytest.warns(UserWarning) as caught:
        model = load_gguf(path, dtype=torch.float32)
    said = [str(w.message) for w in caught]
    for name in LINEARS:  # one warning per requantized tensor, naming it and its type
        assert any(
            f"'blk.0.{name}.weight' has type Q5_0" in m and "int8 (group 64)" in m for m in said
        )
    layer = model.model.layers[0]
    for mod in (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.mlp.up_proj,
        layer.mlp.down_proj,
    ):
        assert isinstance(mod, QuantLinear) and (mod.weight_format, mod.group_size) == ("int8", 64)
    # Requantized from gguf-py's dequantized values, rows un-permuted like an exact block.
    t = {t.name: t for t in GGUFReader(path).tensors}["blk.0.attn_q.weight"]
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type))[
        llama_rope_unpermutation(HIDDEN, HEADS)
    ]
    q = layer.self_attn.q_proj.dequantize()
    assert float((q - ref).norm() / ref.norm()) < 0.01
    ids = torch.tensor([1, 5, 7])
    with torch.no_grad():
        out = model.logits(
            model(ids, torch.arange(3), AttnBatch.packed(cu_seqlens_from_lengths([3])))
        )
    assert out.shape == (3, VOCAB) and torch.isfinite(out).all()


@pytest.mark.parametrize("quant,group,want", [("int4", 32, ("int4", 32)), ("int4", None, ("int4", 64)),
                                              ("mxfp4", None, ("mxfp4", 32)), ("fp8", None, ("fp8", 32))])
def test_load_model_quant_chooses_the_requantize_format(tmp_path: Path, quant: str,
                                                        group: int | None, want: tuple) -> None:
    """`load_model(gguf, quant=...)`: the non-exact GGUF types are requantized to that format
    (the issue's "the chosen format"); the warning says which."""
    from orbit.models.loader import load_model

    path = tmp_path / "tiny-q5_0.gguf"
    write_tiny_llama(path, Q.Q5_0)
    with pytest.warns(UserWarning) as caught:
        model, _ = load_model(path, dtype=torch.float32, quant=quant, group_size=group,
                              with_tokenizer=False)
    assert any("'blk.0.attn_q.weight' has type Q5_0" in str(w.message) and want[0] in str(w.message)
               for w in caught)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and (q.weight_format, q.group_size if want[0] == "int4"
                                           else 32) == want
    # the q/k rows were put back from llama.cpp's RoPE order before requantizing (fp8's
    # 128-row scale blocks cannot be permuted after): the dense load's rows, requantized
    from orbit.models.gguf_loader import load_gguf

    dense = load_gguf(path, dtype=torch.float32, keep_quantized=False)
    ref = dense.model.layers[0].self_attn.q_proj.weight
    # (4-bit requantization error is ~0.1 here; rows in the wrong order would give ~1.4)
    assert float((q.dequantize() - ref).norm() / ref.norm()) < 0.2


def test_exact_gguf_types_ignore_quant(tmp_path: Path) -> None:
    """Q4_1 stays int4 g32 (exact) even when quant names another format."""
    from orbit.models.loader import load_model

    path = tmp_path / "tiny-q4_1.gguf"
    write_tiny_llama(path, Q.Q4_1)
    model, _ = load_model(path, dtype=torch.float32, quant="fp8", with_tokenizer=False)
    q = model.model.layers[0].self_attn.q_proj
    assert (q.weight_format, q.group_size) == ("int4", 32) and q.offset is not None


def test_undequantizable_type_names_file_tensor_and_supported_types(tmp_path: Path) -> None:
    path = tmp_path / "bad-type.gguf"
    where = re.escape(str(path))
    write_tiny_llama(path, Q.Q8_0, {"ffn_up": Q.Q8_1})  # Q8_1: llama.cpp's activation type
    msg = (
        rf"{where}: GGUF tensor 'blk\.0\.ffn_up\.weight' has type Q8_1, which gguf-py cannot "
        r"dequantize.*Q4_0, Q4_1, Q8_0 exact"
    )
    with pytest.raises(ValueError, match=msg):
        load_gguf(path)
    with pytest.raises(ValueError, match=msg):  # the dense path reads through gguf_float
        load_gguf(path, keep_quantized=False)


def test_truncated_file_names_file_tensor_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    where = re.escape(str(path))
    write_tiny_llama(path, Q.Q4_0)
    last = GGUFReader(path).tensors[-1]  # blk.0.ffn_down: [576, 64] Q4_0 = 576 * 2 * 18 bytes
    assert (last.name, last.n_bytes) == ("blk.0.ffn_down.weight", 20736)
    path.write_bytes(path.read_bytes()[: last.data_offset + 1000])
    msg = rf"{where}: GGUF tensor 'blk\.0\.ffn_down\.weight' \(Q4_0.*needs 20736 bytes.*only 1000"
    with pytest.raises(ValueError, match=msg):
        load_gguf(path)
    with pytest.raises(ValueError, match=msg):
        load_model(path, with_tokenizer=False)
