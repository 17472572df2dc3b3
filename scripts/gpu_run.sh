#!/usr/bin/env bash
# Runs ON the lent GPU machine (device tool), from the repository root, in one call:
#   bash scripts/gpu_run.sh [stage] [tests] [bench:NAME[:ARGS]]... [cmd:SHELL]...
#     stage         only stash carried GGUF pieces in /root/orbit-cache and exit
#     tests         pytest tests/gpu (marker gpu)
#     bench:NAME    python scripts/bench/NAME.py (ARGS after a second ':', space-separated)
#     cmd:SHELL     any shell line (e.g. a short training run)
# Wheels in .whl/ are installed to /tmp/site; GGUF pieces carried in .cache/gguf/ are joined in
# /root/orbit-cache (survives between calls while the machine stays warm) and checked by sha256.
# Logs go to $OUT; a summary table is printed last.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/orbit-out}"; mkdir -p "$OUT"
CACHE=/root/orbit-cache; mkdir -p "$CACHE"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -f .whl/SMOLLM2_SHA256 ] && cp .whl/SMOLLM2_SHA256 "$CACHE/SHA256"
for p in .cache/gguf/part-*; do [ -f "$p" ] && cp "$p" "$CACHE/"; done
GGUF="$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ] && [ -f "$CACHE/part-aa" ] && [ -f "$CACHE/part-ab" ] && [ -f "$CACHE/SHA256" ]; then
  cat "$CACHE"/part-* > "$GGUF.tmp"
  if [ "$(sha256sum "$GGUF.tmp" | awk '{print $1}')" = "$(cat "$CACHE/SHA256")" ]; then
    mv "$GGUF.tmp" "$GGUF"; echo "[gpu_run] joined SmolLM2 GGUF (sha256 ok)"
  else echo "[gpu_run] SmolLM2 GGUF sha256 MISMATCH" >&2; rm -f "$GGUF.tmp"; fi
fi
[ -f "$GGUF" ] && export ORBIT_SMOLLM2_GGUF="$GGUF"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'

declare -a SUMMARY=()
STEP_NO=0
step() {  # step NAME CMD...
  local name="$1"; shift
  # numbered, so two steps of the same script (cut at 56 chars) keep separate logs
  STEP_NO=$((STEP_NO + 1))
  local log="$OUT/${STEP_NO}_$(echo "$name" | tr -c 'A-Za-z0-9._-' '_' | cut -c1-56).log"
  local t0=$SECONDS
  echo "===== $name"
  "$@" > "$log" 2>&1; local rc=$?
  tail -n 25 "$log"
  SUMMARY+=("$(printf '%-40s rc=%-3s %5ss' "$name" "$rc" "$((SECONDS - t0))")")
}
for arg in "$@"; do
  case "$arg" in
    stage) echo "[gpu_run] staged: $(ls "$CACHE")"; exit 0 ;;
    tests) step "pytest tests/gpu" python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider --timeout 300 ;;
    bench:*) spec="${arg#bench:}"; name="${spec%%:*}"; args=""; [ "$spec" != "$name" ] && args="${spec#*:}"
             # shellcheck disable=SC2086
             step "bench $name" python3 "scripts/bench/$name.py" $args ;;
    cmd:*) step "cmd ${arg#cmd:}" bash -c "${arg#cmd:}" ;;
    *) echo "unknown step $arg" >&2 ;;
  esac
done
echo; echo "===== summary ($(cat "$OUT/device.txt"))"
for s in "${SUMMARY[@]}"; do echo "$s"; done
