"""scripts/bench/ablate_decode.py runs on CPU on a tiny model: every variant's patch points
still exist in the model code (mock.patch.object refuses a missing attribute), and each
ablated engine still generates its tokens (finite logits reach the sampler)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ablate_decode_small() -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/bench/ablate_decode.py", "--shape", "tiny-qwen3", "--new", "4",
         "--variants", "addnorm,rope,attn,mlp,gemv,lmhead,sampler,nongemv,empty"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [ln.split()[0] for ln in proc.stdout.splitlines() if "us/step" in ln]
    assert names == ["base", "addnorm", "rope", "attn", "mlp", "gemv", "lmhead", "sampler",
                     "nongemv", "empty"]
