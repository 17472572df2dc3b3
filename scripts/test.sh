#!/usr/bin/env bash
# The README's test command, and exactly what CI (.ci/run) runs: install with test tools,
# then run the CPU test suite (unit + integration; GPU tests skip without CUDA).
#   bash scripts/test.sh            # everything that runs on this machine
#   bash scripts/test.sh -m "not slow"   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
VENV="${ORBIT_VENV:-$PWD/.venv}"
export ORBIT_VENV="$VENV"  # launchers started by the tests use the same environment
set +e
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
