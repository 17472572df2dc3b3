"""Load a frozen base model from a HF safetensors directory or a GGUF file.

The model is built on the meta device (no storage), then every weight is read one tensor at a
time from the (memory-mapped) checkpoint, converted, and placed on the target device. When a
quantized format is asked for, each target linear is quantized as soon as its weight is read
and the `nn.Linear` is swapped for a `QuantLinear`, so a full-precision copy of the model is
never materialised: peak extra memory is one float32 weight. Base parameters are frozen
(`requires_grad=False`); only adapters train.

GGUF files go through orbit.models.gguf_loader (config from metadata, exact Q4/Q8 blocks).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from orbit.models.config import ModelConfig
from orbit.models.transformer import CausalLM

# Linears quantized by default: every projection inside the decoder layers. The MoE router
# (`mlp.gate`), embeddings and lm_head stay in `dtype` (they are small and precision-sensitive).
DEFAULT_QUANT_TARGETS = (
    r"model\.layers\.\d+\.self_attn\.[qkvo]_proj",
    r"model\.layers\.\d+\.mlp\.(experts\.\d+\.)?(gate|up|down)_proj",
)
# Checkpoint tensors that carry no weights Orbit needs.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


class SafetensorsDir:
    """Tensor name -> file map of a HF model directory (single file or sharded with index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            try:
                with safe_open(single, "pt") as f:
                    self.weight_map = {k: single.name for k in f.keys()}  # noqa: SIM118
            except Exception as e:  # safetensors' own error type: say which file
                raise ValueError(f"{single}: not a readable safetensors file (truncated or "
                                 f"corrupt?): {e}") from e
        else:
            raise ValueError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
        if missing:
            raise ValueError(f"{self.path}: checkpoint shards listed in the index are missing: {missing}")
        self._open: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __getitem__(self, name: str) -> Tensor:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> Tensor:
        if name not in self.weight_map:
            raise ValueError(f"{self.path}: checkpoint has no tensor {name!r}")
        fname = self.weight_map[name]
        try:
            if fname not in self._open:
                self._open[fname] = safe_open(self.path / fname, "pt")
            return self._open[fname].get_tensor(name)
        except Exception as e:  # safetensors' own error type: say which file
            raise ValueError(f"{self.path / fname}: cannot read tensor {name!r} "
                             f"(truncated or corrupt safetensors file?): {e}") from e


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name`."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _set_param(model: nn.Module, name: str, value: Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(value, requires_grad=False))


def _check_tensor(name: str, got: Tensor, want: torch.Size, where: str) -> None:
    if tuple(got.shape) != tuple(want):
        raise ValueError(
            f"{where}: tensor {name!r} has shape {tuple(got.shape)}, the config implies {tuple(want)}"
        )
    # A float parameter read from an int or fp8 tensor would be cast silently (fp8 without
    # its scale, or packed int4 words as numbers): refuse it; quantized weights need a
    # quantization_config so they go through the checkpoint readers instead.
    if not got.dtype.is_floating_point or got.dtype.itemsize < 2:  # ints, fp8 variants
        raise ValueError(
            f"{where}: tensor {name!r} has dtype {got.dtype}, expected float32/float16/bfloat16 "
            "(a quantized tensor needs the checkpoint's quantization_config)"
        )


def materialize(
    model: CausalLM,
    read: Callable[[str], Tensor | None],
    dtype: torch.dtype,
    device: torch.device | str,
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    quant_targets: tuple[str, ...] = DEFAULT_QUANT_TARGETS,
    where: str = "checkpoint",
    read_linear: Callable[[str], nn.Module | None] | None = None,
) -> None:
    """Fill a meta-device `model` tensor by tensor.

    `read(name)` returns the float tensor for a parameter name (None if absent). `read_linear`
    may return a ready module (e.g. a QuantLinear of pre-quantized weights) for a linear's
    name, bypassing `read`. With `quant`, target linears are quantized right after reading.
    """
    targets = [re.compile(p) for p in quant_targets]
    tied = model.config.tie_word_embeddings
    missing: list[str] = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, mod in linears.items():
        if tied and name == "lm_head":
            continue  # re-tied to the embedding below
        ready = read_linear(name) if read_linear is not None else None
        if ready is not None:
            if (ready.in_features, ready.out_features) != (mod.in_features, mod.out_features):
                raise ValueError(
                    f"{where}: linear {name!r} is {ready.out_features}x{ready.in_features}, the "
                    f"config implies {mod.out_features}x{mod.in_features}"
                )
            has_bias = getattr(ready, "bias", None) is not None
            if mod.bias is not None and not has_bias:
                missing.append(name + ".bias")  # the config has one: never drop it silently
            if mod.bias is None and has_bias:
                raise ValueError(f"{where}: tensor {name + '.bias'!r} is in the checkpoint but "
                                 "the config has no bias there (attention_bias / mlp_bias)")
            if has_bias:
                _check_tensor(name + ".bias", ready.bias, mod.bias.shape, where)
            # a quantized module keeps its codes and scales; its bias takes the compute dtype
            set_module(model, name, ready.to(device).to(dtype))
            continue
        w = read(name + ".weight")
        b = read(name + ".bias") if mod.bias is not None else None
        if w is None or (mod.bias is not None and b is None):
            missing.append(name + (".weight" if w is None else ".bias"))
            continue
        _check_tensor(name + ".weight", w, mod.weight.shape, where)
        if b is not None:
            _check_tensor(name + ".bias", b, mod.bias.shape, where)
        bias = b.to(device=device, dtype=dtype) if b is not None else None
        if quant is not None and any(t.fullmatch(name) for t in targets):
            from orbit.quant.linear import QuantLinear
            from orbit.quant.quantize import quantize

            try:
                qw = quantize(w.to(device), quant, group_size=group_size, symmetric=symmetric)
            except ValueError as e:  # e.g. the group does not divide in_features: say which layer
                raise ValueError(
                    f"{name}: cannot quantize its weight {list(w.shape)} to {quant} "
                    f"(group_size={group_size}, symmetric={symmetric}) while loading {where}: {e}"
                ) from e
            set_module(model, name, QuantLinear(qw, bias))
        else:
            _set_param(model, name + ".weight", w.to(device=device, dtype=dtype))
            if bias is not None:
                _set_param(model, name + ".bias", bias)
        del w
    for name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        t = read(name)
        if t is None:
            missing.append(name)
            continue
        _check_tensor(name, t, p.shape, where)
        _set_param(model, name, t.to(device=device, dtype=dtype))
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise ValueError(f"{where}: missing tensors {missing[:10]}{more}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"meta tensors left after loading: {left[:5]}"


def load_hf_dir(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    quant_targets: tuple[str, ...] = DEFAULT_QUANT_TARGETS,
) -> CausalLM:
    """A HF safetensors model directory -> frozen `CausalLM` (quantized on the fly if `quant`)."""
    path = Path(path)
    cfg_dict = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
    if cfg_dict is None:
        raise ValueError(f"{path}: no config.json (not a HF model directory)")
    config = ModelConfig.from_hf_dict(cfg_dict)
    ckpt = SafetensorsDir(path)
    qcfg = cfg_dict.get("quantization_config")
    read_linear = None
    if qcfg:
        if quant is not None:
            raise ValueError(
                f"{path} is already quantized ({qcfg.get('quant_method')}); do not pass quant={quant!r}"
            )
        read_linear = _prequantized_reader(ckpt, qcfg)
    with torch.device("meta"):
        model = CausalLM(config)
    used: set[str] = set()

    def read(name: str) -> Tensor | None:
        if name not in ckpt:
            return None
        used.add(name)
        return ckpt.get(name)

    materialize(model, read, dtype, device, quant, group_size, symmetric, quant_targets,
                where=str(path), read_linear=read_linear)
    if read_linear is None:
        extra = [
            k for k in ckpt
            if k not in used and not _IGNORED.match(k)
            and not (config.tie_word_embeddings and k == "lm_head.weight")
        ]
        if extra:
            raise ValueError(
                f"{path}: checkpoint tensors the {config.arch} config does not use: {extra[:10]}"
                " (wrong architecture, or fused expert tensors Orbit does not read)"
            )
    return model.eval()


def _prequantized_reader(ckpt: SafetensorsDir, qcfg: dict[str, Any]) -> Callable[[str], nn.Module | None]:
    """Linear name -> QuantLinear read exactly as stored in a pre-quantized checkpoint (None when
    that linear is stored unquantized, so it loads like any float weight)."""
    from orbit.quant.checkpoint import read_linear
    from orbit.quant.linear import QuantLinear
    from orbit.quant.qconfig import linear_scheme

    def read_quantized(name: str) -> nn.Module | None:
        if linear_scheme(name, qcfg).style is None:
            return None
        qw = read_linear(ckpt, name, qcfg)
        bias = ckpt.get(name + ".bias") if name + ".bias" in ckpt else None
        return QuantLinear(qw, bias)

    return read_quantized


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    quant: str | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    quant_targets: tuple[str, ...] = DEFAULT_QUANT_TARGETS,
    with_tokenizer: bool = True,
) -> tuple[CausalLM, Any]:
    """(frozen CausalLM, tokenizer or None) from a HF directory or a `.gguf` file.

    `dtype` is the compute dtype of everything not quantized (norms, embeddings, lm_head, and
    all linears when `quant` is None). GGUF linears stored as Q4_0/Q4_1/Q8_0 keep their exact
    format whatever `quant` says; `quant` (default int8) and `group_size` choose what the other
    GGUF types are requantized to. The tokenizer is None when the directory ships no tokenizer
    files.
    """
    from orbit.models.tokenizer import load_tokenizer

    p = Path(path)
    if p.suffix == ".gguf":
        from orbit.models.gguf_loader import load_gguf

        model = load_gguf(p, dtype=dtype, device=device, fallback_fmt=quant or "int8",
                          fallback_group_size=group_size)
        tok = load_tokenizer(p) if with_tokenizer else None
        return model, tok
    if not p.is_dir():
        raise ValueError(f"{p}: neither a model directory nor a .gguf file")
    model = load_hf_dir(p, dtype, device, quant, group_size, symmetric, quant_targets)
    return model, (load_tokenizer(p) if with_tokenizer else None)
