"""The launchers' preflight gate (examples/common.sh::run_preflight), driven through the real
quickstart launcher with a stand-in interpreter (ORBIT_VENV) that records how it is called:
SKIP_PREFLIGHT=1 skips the check, a passing check runs before the trainer, a failing check or
an interpreter that cannot import orbit.preflight stops the launcher before the trainer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "examples/quickstart/run-smollm2-135m-q4_1-lora.sh"

FAKE_PYTHON = """#!/usr/bin/env bash
# Records each call; `-c` is the import probe, `-m orbit.preflight` the check, `-m orbit.train`
# the trainer. Exit codes come from the environment.
echo "$*" >> "$FAKE_LOG"
if [[ "$1" == "-c" ]]; then
  [[ "${FAKE_IMPORT_RC:-0}" == "0" ]] || echo "ModuleNotFoundError: No module named 'orbit'" >&2
  exit "${FAKE_IMPORT_RC:-0}"
fi
if [[ "$1" == "-m" && "$2" == "orbit.preflight" ]]; then exit "${FAKE_PREFLIGHT_RC:-0}"; fi
exit 0
"""


def launch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    log = tmp_path / "calls.log"
    full = {k: v for k, v in os.environ.items()
            if k not in ("ORBIT_DRY_RUN_ARGV", "SKIP_PREFLIGHT", "CUDA_HOME")}
    full.update({"ORBIT_VENV": str(venv), "FAKE_LOG": str(log), "HOME": str(tmp_path),
                 "ENABLE_WANDB": "0"}, **env)
    proc = subprocess.run(["bash", str(LAUNCHER)], env=full, capture_output=True, text=True,
                          timeout=60, check=False)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def _ran(calls: list[str], module: str) -> bool:
    return any(c.startswith(f"-m {module}") for c in calls)


def test_passing_preflight_runs_before_the_trainer(tmp_path: Path) -> None:
    proc, calls = launch(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _ran(calls, "orbit.preflight") and _ran(calls, "orbit.train")
    order = [c.split()[1] for c in calls if c.split()[:2] in (["-m", "orbit.preflight"],
                                                               ["-m", "orbit.train"])]
    assert order == ["orbit.preflight", "orbit.train"]


def test_skip_preflight_skips_the_check(tmp_path: Path) -> None:
    proc, calls = launch(tmp_path, SKIP_PREFLIGHT="1", FAKE_PREFLIGHT_RC="3")
    assert proc.returncode == 0, proc.stderr
    assert "preflight skipped (SKIP_PREFLIGHT=1)" in proc.stdout
    assert not _ran(calls, "orbit.preflight") and _ran(calls, "orbit.train")


def test_failing_preflight_stops_the_launcher(tmp_path: Path) -> None:
    proc, calls = launch(tmp_path, FAKE_PREFLIGHT_RC="3")
    assert proc.returncode != 0
    assert _ran(calls, "orbit.preflight") and not _ran(calls, "orbit.train")
    assert "preflight failed" in proc.stderr and "SKIP_PREFLIGHT=1" in proc.stderr


def test_interpreter_without_orbit_stops_the_launcher(tmp_path: Path) -> None:
    proc, calls = launch(tmp_path, FAKE_IMPORT_RC="1")
    assert proc.returncode != 0
    assert not _ran(calls, "orbit.preflight") and not _ran(calls, "orbit.train")
    assert "cannot import orbit.preflight" in proc.stderr
    assert "No module named 'orbit'" in proc.stderr
