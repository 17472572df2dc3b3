"""Adapters in and out as PEFT directories (`adapter_config.json` + `adapter_model.safetensors`)
that `peft.PeftModel.from_pretrained` loads onto the plain transformers model.

Keys are `base_model.model.<module path>.{lora_A,lora_B,oft_R}.weight` with the model's own
path (no `.base`, no adapter name), exactly what PEFT writes. Loading validates everything
against the injected set and reports every mismatch in one ValueError. Writes are atomic: a
temporary sibling directory is filled, then swapped in with `os.replace`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from orbit.adapters.inject import is_base_linear, matches

if TYPE_CHECKING:
    from orbit.adapters.inject import AdapterConfig, AdapterSet

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _peft_version() -> str:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:
        return "0.18.0"  # the first release with this OFT parameterization


def state_dict_peft(aset: AdapterSet, slot: int = 0) -> dict[str, Tensor]:
    out = {}
    for path, mod in aset.modules.items():
        for name in mod.slot_names:
            out[f"{PREFIX}{path}.{name}.weight"] = mod.slot_tensor(slot, name).detach().clone()
    return out


def target_modules(aset: AdapterSet) -> list[str] | str:
    """Leaf names when they select exactly the wrapped modules in PEFT's suffix rule, else an
    exact-path regex (PEFT fullmatches a string), so PEFT wraps the same modules as Orbit."""
    leaves = sorted({p.rpartition(".")[2] for p in aset.modules})
    would_match = {
        path.removesuffix(".base")
        for path, mod in aset.model.named_modules()
        if is_base_linear(mod) and any(matches(path.removesuffix(".base"), t) for t in leaves)
    }
    if would_match == set(aset.modules):
        return leaves
    return "^(" + "|".join(p.replace(".", r"\.") for p in sorted(aset.modules)) + ")$"


def peft_config(aset: AdapterSet, base_model_name_or_path: str = "") -> dict[str, Any]:
    cfg = aset.cfg
    common = {
        "base_model_name_or_path": base_model_name_or_path or None,
        "task_type": "CAUSAL_LM",
        "target_modules": target_modules(aset),
        "inference_mode": True,
        "bias": "none",
        "fan_in_fan_out": False,
        "peft_version": _peft_version(),
    }
    if cfg.kind == "lora":
        return {
            "peft_type": "LORA",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "init_lora_weights": True,
            **common,
        }
    use_block = cfg.block_size > 0
    return {
        "peft_type": "OFT",
        "r": 0 if use_block else cfg.r,
        "oft_block_size": cfg.block_size if use_block else 0,
        "use_cayley_neumann": cfg.cayley_neumann,
        "num_cayley_neumann_terms": cfg.num_terms,
        "block_share": cfg.block_share,
        "coft": False,
        "eps": 6e-5,
        "module_dropout": 0.0,
        "init_weights": True,
        **common,
    }


def save_peft(
    aset: AdapterSet, path: str | Path, base_model_name_or_path: str = "", slot: int = 0
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = {k: v.contiguous().cpu() for k, v in state_dict_peft(aset, slot).items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(peft_config(aset, base_model_name_or_path), indent=2)
        )
        if path.exists():
            # os.replace cannot overwrite a non-empty directory: move the old one aside first.
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _check_config(aset: AdapterSet, conf: dict[str, Any]) -> list[str]:
    cfg = aset.cfg
    want_type = {"lora": "LORA", "oft": "OFT"}[cfg.kind]
    if conf.get("peft_type") != want_type:
        return [f"peft_type: file has {conf.get('peft_type')!r}, model has {want_type!r}"]
    mine = peft_config(aset)
    keys = (
        ["r", "lora_alpha", "use_rslora"]
        if cfg.kind == "lora"
        else [
            "r",
            "oft_block_size",
            "use_cayley_neumann",
            "num_cayley_neumann_terms",
            "block_share",
        ]
    )
    defaults = {
        "use_rslora": False,
        "use_cayley_neumann": True,
        "num_cayley_neumann_terms": 5,
        "block_share": False,
        "oft_block_size": 0,
        "r": 8,
    }
    errors = []
    for k in keys:
        got = conf.get(k, defaults.get(k))
        if got != mine[k] and not (isinstance(got, (int, float)) and float(got) == float(mine[k])):
            errors.append(f"{k}: file has {got!r}, model has {mine[k]!r}")
    if cfg.kind == "oft" and conf.get("coft", False):
        errors.append("coft: constrained OFT is not supported")
    return errors


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT adapter dir; ValueError naming what is missing."""
    path = Path(path)
    conf_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not conf_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"{path} is not a PEFT adapter dir: needs {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        conf = json.loads(conf_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{conf_file} is not valid JSON: {e}") from e
    if not isinstance(conf, dict) or "peft_type" not in conf:
        raise ValueError(f"{conf_file} has no peft_type: not a PEFT adapter config")
    return conf


def adapter_config_from_peft(path: str | Path, dtype: torch.dtype) -> AdapterConfig:
    """The AdapterConfig that injects the modules and shapes a PEFT adapter dir holds (LoRA
    or OFT, as Orbit or PEFT wrote it), for serving it: no dropout. ValueError for a field
    Orbit cannot serve, naming the file and the field."""
    from orbit.adapters.inject import AdapterConfig

    conf = read_peft_config(path)
    where = Path(path) / CONFIG_NAME
    kind = {"LORA": "lora", "OFT": "oft"}.get(conf["peft_type"])
    if kind is None:
        raise ValueError(f"{where}: peft_type {conf['peft_type']!r} is not served "
                         f"(LORA or OFT)")
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        targets = [f"re:{targets}"]  # PEFT fullmatches a string against the module path
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{where}: target_modules must be a string or a list of names, "
                         f"got {targets!r}")
    if kind == "lora":
        for field in ("use_dora", "lora_bias"):
            if conf.get(field):
                raise ValueError(f"{where}: {field}={conf[field]!r} is not supported")
        return AdapterConfig(kind="lora", r=int(conf.get("r", 8)),
                             alpha=float(conf.get("lora_alpha", 8)),
                             use_rslora=bool(conf.get("use_rslora", False)),
                             targets=tuple(targets), dtype=dtype)
    if conf.get("coft", False):
        raise ValueError(f"{where}: coft (constrained OFT) is not supported")
    return AdapterConfig(kind="oft", r=int(conf.get("r", 0) or 0),
                         block_size=int(conf.get("oft_block_size", 0) or 0),
                         cayley_neumann=bool(conf.get("use_cayley_neumann", True)),
                         num_terms=int(conf.get("num_cayley_neumann_terms", 5)),
                         block_share=bool(conf.get("block_share", False)),
                         targets=tuple(targets), dtype=dtype)


def serve_peft(model: torch.nn.Module, path: str | Path, dtype: torch.dtype,
               slot: int = 1) -> AdapterSet:
    """Inject the adapter a PEFT dir describes into `model`, load its weights into `slot`
    (default the serve slot) and make that slot active: what `orbit generate --adapter` runs."""
    from orbit.adapters.inject import inject_adapters

    aset = inject_adapters(model, adapter_config_from_peft(path, dtype))
    load_peft(aset, path, slot=slot)
    aset.set_active(slot)
    return aset


def load_peft(aset: AdapterSet, path: str | Path, slot: int = 0) -> None:
    """Load a PEFT adapter directory into `slot`; ValueError listing every mismatch."""
    path = Path(path)
    conf = read_peft_config(path)
    errors = _check_config(aset, conf)
    tensors = load_file(str(path / WEIGHTS_NAME))
    want = state_dict_peft_shapes(aset)
    for key, t in tensors.items():
        if key not in want:
            errors.append(f"unexpected key {key} {tuple(t.shape)}")
        elif tuple(t.shape) != want[key]:
            errors.append(f"shape of {key}: file {tuple(t.shape)}, model {want[key]}")
    errors += [f"missing key {k} {s}" for k, s in want.items() if k not in tensors]
    if errors:
        raise ValueError(f"PEFT adapter {path} does not fit the model:\n  " + "\n  ".join(errors))
    with torch.no_grad():
        for p, mod in aset.modules.items():
            for name in mod.slot_names:
                mod.slot_tensor(slot, name).copy_(tensors[f"{PREFIX}{p}.{name}.weight"])
            mod.slots_written()


def state_dict_peft_shapes(aset: AdapterSet) -> dict[str, tuple[int, ...]]:
    return {
        f"{PREFIX}{p}.{name}.weight": tuple(mod.slot_tensor(0, name).shape)
        for p, mod in aset.modules.items()
        for name in mod.slot_names
    }
