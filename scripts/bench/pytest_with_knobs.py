"""Run pytest in this process after setting module knobs (for a GPU check of a non-default
setting without editing the code): python3 scripts/bench/pytest_with_knobs.py
MODULE.NAME=VALUE [...] -- PYTEST ARGS. Values are Python literals (knobs.set_knob)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from knobs import set_knob  # noqa: E402

if __name__ == "__main__":
    import pytest

    cut = sys.argv.index("--")
    for kv in sys.argv[1:cut]:
        set_knob(kv)
    sys.exit(pytest.main(sys.argv[cut + 1 :]))
