#!/usr/bin/env bash
# Clean-room gate: clone the repo into a temporary directory, build a fresh virtual
# environment there, and run the README's two commands in their quick forms. This is how a
# release (and a developer before stopping) proves nothing depends on a warm machine.
#   bash scripts/release/clean_room_gate.sh            # clones this checkout (committed HEAD)
#   PUBLIC_ORBIT_URL=<git url> bash scripts/release/clean_room_gate.sh
# Knobs: GATE_PYTEST_ARGS (default: -m "not slow"), KEEP_GATE_DIR=1 keeps the temp dir.
set -euo pipefail
SRC="${PUBLIC_ORBIT_URL:-$(cd "$(dirname "$0")/../.." && pwd)}"
WORK="$(mktemp -d -t orbit-gate-XXXXXX)"
cleanup() { if [ "${KEEP_GATE_DIR:-0}" != 1 ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi; }
trap cleanup EXIT
echo "[gate] cloning $SRC into $WORK/orbit"
git clone -q "$SRC" "$WORK/orbit"
cd "$WORK/orbit"
export ORBIT_VENV="$WORK/venv"
t0=$SECONDS
echo "[gate] (1) main command, smoke form"
bash scripts/install.sh
NUM_ROLLOUT=1 TOTAL_EPOCHS=1 TRAIN_ROWS=1 ROLLOUT_BATCH_SIZE=1 N_SAMPLES_PER_PROMPT=1 \
  GLOBAL_BATCH_SIZE=1 DISABLE_EVAL=1 ENABLE_WANDB=0 SAVE_DIR="$WORK/run" \
  bash examples/quickstart/run-smollm2-135m-q4_1-lora.sh
echo "[gate] (1) ok after $((SECONDS - t0)) s"
echo "[gate] (2) test command, quick form"
# shellcheck disable=SC2086
eval bash scripts/test.sh ${GATE_PYTEST_ARGS:--m \"not slow\"}
echo "[gate] PASSED in $((SECONDS - t0)) s"
