"""The train CLI front doors: `python -m orbit.train` and `python -m orbit train`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orbit.entrypoints.train import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv", [["-m", "orbit.train", "--help"], ["-m", "orbit", "train", "--help"]])
def test_help_lists_the_groups(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    for group in ("cluster (ClusterConfig)", "optim (OptimConfig)", "--n-samples-per-prompt", "--lora-rank"):
        assert group in r.stdout


def test_invalid_config_exits_2_naming_the_flag(capsys) -> None:
    assert main(["--rollout-batch-size", "3", "--n-samples-per-prompt", "2", "--global-batch-size", "4",
                 "--prompt-data", "x.jsonl"]) == 2
    assert "--global-batch-size" in capsys.readouterr().err
    assert main([]) == 2
    assert "--prompt-data" in capsys.readouterr().err
