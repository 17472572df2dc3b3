# Shared helpers for the Orbit launchers (sourced, never run directly).
#
# Each launcher builds grouped bash arrays (CKPT_ARGS, PRECISION_ARGS, ...) and hands them to
# `orbit_launch`, which resolves the Python interpreter, W&B, the optional preflight check and
# the ORBIT_DRY_RUN_ARGV=1 dry run in one place, so the launchers themselves stay readable.

# The repository root, so `python -m orbit.train` works without an install.
ORBIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

orbit_python() {
  if [[ -n "${ORBIT_VENV:-}" ]]; then
    if [[ ! -x "$ORBIT_VENV/bin/python" ]]; then
      echo "ORBIT_VENV=$ORBIT_VENV has no bin/python" >&2
      return 1
    fi
    echo "$ORBIT_VENV/bin/python"
  elif [[ -x "$ORBIT_ROOT/.venv/bin/python" ]]; then
    echo "$ORBIT_ROOT/.venv/bin/python"
  else
    command -v python3
  fi
}

# require_var NAME "what it is": stop with a message naming the variable when it is unset.
require_var() {
  local name="$1" what="$2"
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is required ($what). Example: $name=/path/to/it bash $0" >&2
    exit 2
  fi
}

# The megatron backend is planned, not built: refuse clearly instead of failing deep inside.
reject_megatron() {
  if [[ -n "${MEGATRON_LOAD:-}" ]]; then
    echo "error: MEGATRON_LOAD is set, but the megatron trainer backend is not built yet;" \
         "unset MEGATRON_LOAD to use the torch backend with HF_CKPT" >&2
    exit 2
  fi
}

# ENABLE_WANDB: auto (default) = on when $HOME/.wandb_key exists; 0/1 force it.
wandb_setting() {
  local mode="${ENABLE_WANDB:-auto}"
  case "$mode" in
    auto) if [[ -f "$HOME/.wandb_key" ]]; then echo 1; else echo 0; fi ;;
    0|1) echo "$mode" ;;
    *) echo "error: ENABLE_WANDB must be auto, 0 or 1 (got '$mode')" >&2; return 1 ;;
  esac
}

# CUDA_HOME (optional) puts that toolkit's nvcc/ptxas first for Triton.
setup_cuda_home() {
  if [[ -n "${CUDA_HOME:-}" ]]; then
    export CUDA_HOME
    export PATH="$CUDA_HOME/bin:$PATH"
  fi
}

# Preflight (train/rollout log-prob parity) runs unless SKIP_PREFLIGHT=1. A failing preflight
# stops the launcher (the trainer never starts); so does an interpreter that cannot import
# orbit.preflight: that is a broken install, not a reason to train unchecked.
run_preflight() {
  local py="$1"; shift
  if [[ "${SKIP_PREFLIGHT:-0}" == "1" ]]; then
    echo "preflight skipped (SKIP_PREFLIGHT=1)"
    return 0
  fi
  local err
  if ! err="$(cd "$ORBIT_ROOT" && "$py" -c "import orbit.preflight" 2>&1)"; then
    echo "error: $py cannot import orbit.preflight (set ORBIT_VENV to the environment Orbit is" \
         "installed in, or SKIP_PREFLIGHT=1 to train without the check):" >&2
    echo "$err" | tail -n 5 >&2
    return 1
  fi
  if ! (cd "$ORBIT_ROOT" && "$py" -m orbit.preflight "$@"); then
    echo "error: preflight failed (see above); not starting the trainer." \
         "SKIP_PREFLIGHT=1 skips the check" >&2
    return 1
  fi
}

# bool_flag VAR DEFAULT NAME: --NAME when $VAR (default DEFAULT) is 1, --no-NAME when it is 0;
# any other value is an error naming VAR.
bool_flag() {
  local value="${!1:-$2}"
  case "$value" in
    1) echo "--$3" ;;
    0) echo "--no-$3" ;;
    *) echo "$1 must be 0 or 1, got '${value}'" >&2; return 1 ;;
  esac
}

# ray_flag: --use-ray (default) or --no-use-ray when USE_RAY=0 (one in-process worker, for a
# machine without Ray).
ray_flag() { bool_flag USE_RAY 1 use-ray; }

# pdl_flag: programmatic dependent launch of the rollout engine's decode kernels (ROLLOUT_PDL=1,
# the default: on sm_90+ GPUs; scheduling only, the same tokens and log-probs).
pdl_flag() { bool_flag ROLLOUT_PDL 1 rollout-pdl; }

# overlap_flag: overlapped decode in the rollout engine (ROLLOUT_OVERLAP=1, the default: each
# decode step is launched before the host reads the previous step's tokens; CUDA only).
overlap_flag() { bool_flag ROLLOUT_OVERLAP 1 rollout-overlap; }

# fuse_lora_flag: the rollout engine runs each decode step's LoRA adapters as one shrink and one
# expand-add launch per q/k/v, o, gate/up and down group (ROLLOUT_FUSE_LORA=1, the default: on
# CUDA outside exact mode; docs/rollout.md).
fuse_lora_flag() { bool_flag ROLLOUT_FUSE_LORA 1 rollout-fuse-lora; }

# orbit_launch ARGS...: print the argv (dry run) or run preflight and then the trainer.
orbit_launch() {
  local py
  py="$(orbit_python)"
  local argv=("$py" -m orbit.train "$@")
  if [[ "${ORBIT_DRY_RUN_ARGV:-0}" == "1" ]]; then
    printf '%s\n' "${argv[@]}"
    exit 0
  fi
  setup_cuda_home
  if [[ "$(wandb_setting)" == "1" && -z "${WANDB_API_KEY:-}" && -f "$HOME/.wandb_key" ]]; then
    WANDB_API_KEY="$(<"$HOME/.wandb_key")"
    export WANDB_API_KEY
  fi
  run_preflight "$py" "${CKPT_ARGS[@]}" "${PRECISION_ARGS[@]}" "${ADAPTER_ARGS[@]}" || exit 1
  cd "$ORBIT_ROOT"
  exec "${argv[@]}"
}
