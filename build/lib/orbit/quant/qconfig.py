"""HF `quantization_config` dicts: recognise a checkpoint's quantization style, build one to write.

Kept apart from the tensor readers in checkpoint.py because the config is model-wide (which
modules are quantized, in what scheme) while the readers work one linear at a time.
Styles:
- `compressed-tensors`: quant_method "compressed-tensors", formats `pack-quantized` (INT4),
  `nvfp4-pack-quantized`, `mxfp4-pack-quantized`;
- `deepseek-fp8`: quant_method "fp8" with 128x128 `weight_block_size` (DeepSeek-V3, Qwen3-FP8);
- `modelopt`: quant_method "modelopt", quant_algo "NVFP4";
- `gpt-oss`: quant_method "mxfp4" (`*_blocks` / `*_scales` expert tensors).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STYLES = ("compressed-tensors", "deepseek-fp8", "modelopt", "gpt-oss")
CT_FORMATS = {
    "int4": "pack-quantized",
    "nvfp4": "nvfp4-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
}


@dataclass(frozen=True)
class LinearScheme:
    """How one linear is stored: `style` None means an unquantized float `weight`."""

    style: str | None
    fmt: str
    group_size: int = 0
    symmetric: bool = True


UNQUANTIZED = LinearScheme(None, "bf16")


def _matches(name: str, pattern: str) -> bool:
    """compressed-tensors target/ignore matching: `re:<regex>` or a name / name suffix."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _ct_scheme(name: str, cfg: dict[str, Any], is_linear: bool) -> LinearScheme:
    if any(_matches(name, p) for p in cfg.get("ignore") or []):
        return UNQUANTIZED
    groups = cfg.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors quantization_config has no config_groups")
    for gname, group in groups.items():
        targets = group.get("targets") or []
        if not any(_matches(name, t) or (is_linear and t == "Linear") for t in targets):
            continue
        w = group.get("weights")
        if w is None:
            return UNQUANTIZED
        fmt_name = group.get("format") or cfg.get("format")
        num_bits, wtype = w.get("num_bits"), w.get("type")
        if fmt_name == "pack-quantized" and num_bits == 4 and wtype == "int":
            strategy = w.get("strategy")
            if strategy not in ("group", "channel"):
                raise ValueError(
                    f"config_groups.{gname}.weights.strategy {strategy!r}: only 'group' and "
                    "'channel' INT4 are supported"
                )
            g = 0  # channel: one scale per whole row
            if strategy == "group":
                g = w.get("group_size")
                if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
                    raise ValueError(
                        f"config_groups.{gname}.weights.group_size must be a positive integer "
                        f"for strategy 'group', got {g!r}"
                    )
            return LinearScheme("compressed-tensors", "int4", g, bool(w.get("symmetric", True)))
        if fmt_name == "nvfp4-pack-quantized":
            return LinearScheme("compressed-tensors", "nvfp4", 16)
        if fmt_name == "mxfp4-pack-quantized":
            return LinearScheme("compressed-tensors", "mxfp4", 32)
        raise ValueError(
            f"compressed-tensors format {fmt_name!r} with {num_bits}-bit {wtype} weights "
            f"(config_groups.{gname}) is not supported; supported: {sorted(CT_FORMATS.values())}"
        )
    return UNQUANTIZED


def linear_scheme(
    name: str, quantization_config: dict[str, Any] | None, is_linear: bool = True
) -> LinearScheme:
    """The storage scheme of module `name` (e.g. `model.layers.0.mlp.down_proj`)."""
    cfg = quantization_config
    if not cfg:
        return UNQUANTIZED
    method = cfg.get("quant_method")
    if method == "compressed-tensors":
        return _ct_scheme(name, cfg, is_linear)
    if method == "fp8":
        block = list(cfg.get("weight_block_size") or [])
        if block != [128, 128]:
            raise ValueError(
                f"fp8 quantization_config.weight_block_size {block}: only [128, 128] is supported"
            )
        if cfg.get("fmt", "e4m3") != "e4m3":
            raise ValueError(
                f"fp8 quantization_config.fmt {cfg.get('fmt')!r}: only 'e4m3' is supported"
            )
        if any(_matches(name, p) for p in cfg.get("modules_to_not_convert") or []):
            return UNQUANTIZED
        return LinearScheme("deepseek-fp8", "fp8", 128)
    if method == "modelopt":
        algo = cfg.get("quant_algo")
        if algo != "NVFP4":
            raise ValueError(f"modelopt quant_algo {algo!r}: only 'NVFP4' is supported")
        exclude = cfg.get("exclude_modules") or cfg.get("ignore") or []
        # ModelOpt writes globs such as "*lm_head*" or "model.layers.0.mlp*"
        if any(_matches(name, p) or fnmatch.fnmatchcase(name, p) for p in exclude):
            return UNQUANTIZED
        return LinearScheme("modelopt", "nvfp4", 16)
    if method == "mxfp4":
        if any(_matches(name, p) for p in cfg.get("modules_to_not_convert") or []):
            return UNQUANTIZED
        return LinearScheme("gpt-oss", "mxfp4", 32)
    raise ValueError(
        f"unsupported quantization_config.quant_method {method!r}; supported: "
        "'compressed-tensors', 'fp8' (DeepSeek block FP8), 'modelopt' (NVFP4), 'mxfp4' (gpt-oss)"
    )


def quantization_config(
    style: str,
    fmt: str,
    group_size: int | None = None,
    symmetric: bool = True,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = ("lm_head",),
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a checkpoint written in `style`."""
    if style == "compressed-tensors":
        if fmt not in CT_FORMATS:
            raise ValueError(
                f"compressed-tensors writing supports {sorted(CT_FORMATS)}, not {fmt!r}"
            )
        if fmt == "int4":
            weights = {
                "num_bits": 4,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": group_size or 128,
                "dynamic": False,
            }
        elif fmt == "nvfp4":
            weights = {
                "num_bits": 4,
                "type": "float",
                "symmetric": True,
                "strategy": "tensor_group",
                "group_size": 16,
                "dynamic": False,
                "scale_dtype": "torch.float8_e4m3fn",
            }
        else:
            weights = {
                "num_bits": 4,
                "type": "float",
                "symmetric": True,
                "strategy": "group",
                "group_size": 32,
                "dynamic": False,
                "scale_dtype": "torch.uint8",
            }
        group = {
            "targets": list(targets),
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMATS[fmt],
        }
        return {
            "quant_method": "compressed-tensors",
            "format": CT_FORMATS[fmt],
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(ignore),
            "kv_cache_scheme": None,
        }
    if style == "deepseek-fp8":
        _expect(style, fmt, "fp8")
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": list(ignore),
        }
    if style == "modelopt":
        _expect(style, fmt, "nvfp4")
        return {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "group_size": 16,
            "kv_cache_quant_algo": None,
            "exclude_modules": list(ignore),
        }
    if style == "gpt-oss":
        _expect(style, fmt, "mxfp4")
        return {"quant_method": "mxfp4", "modules_to_not_convert": list(ignore)}
    raise ValueError(f"unknown checkpoint style {style!r}; expected one of {STYLES}")


def _expect(style: str, fmt: str, want: str) -> None:
    if fmt != want:
        raise ValueError(f"checkpoint style {style!r} stores {want!r} weights, not {fmt!r}")
