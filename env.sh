# Source me: `source env.sh`. Safe on any machine, CPU-only included; never exits the shell.
# Auto-detects CUDA_HOME, the GPU arch (TORCH_CUDA_ARCH_LIST) and the Python environment
# (ORBIT_VENV). Every value can be set before sourcing and is then kept as is.
if [ -n "${BASH_VERSION:-}" ]; then eval '_orbit_src="${BASH_SOURCE[0]}"'
elif [ -n "${ZSH_VERSION:-}" ]; then eval '_orbit_src="${(%):-%x}"'
else _orbit_src="./env.sh"; fi
_orbit_root="$(cd "$(dirname "$_orbit_src")" && pwd)"

if [ -z "${ORBIT_VENV:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then ORBIT_VENV="$VIRTUAL_ENV"
  elif [ -x "$_orbit_root/.venv/bin/python" ]; then ORBIT_VENV="$_orbit_root/.venv"
  else ORBIT_VENV=""; fi
fi
export ORBIT_VENV
if [ -n "$ORBIT_VENV" ] && [ -x "$ORBIT_VENV/bin/python" ]; then
  ORBIT_PYTHON="$ORBIT_VENV/bin/python"
else
  ORBIT_PYTHON="$(command -v python3 || command -v python || echo python3)"
fi
export ORBIT_PYTHON

if [ -z "${CUDA_HOME:-}" ]; then
  for _c in /usr/local/cuda /usr/local/cuda-13 /usr/local/cuda-13.0 /usr/local/cuda-12; do
    if [ -d "$_c" ]; then CUDA_HOME="$_c"; break; fi
  done
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  fi
fi
export CUDA_HOME="${CUDA_HOME:-}"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  TORCH_CUDA_ARCH_LIST="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd';' -)"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}"
export PYTHONPATH="$_orbit_root${PYTHONPATH:+:$PYTHONPATH}"

echo "[orbit env] ORBIT_VENV=${ORBIT_VENV:-<none>} python=$ORBIT_PYTHON CUDA_HOME=${CUDA_HOME:-<none>} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<cpu>}"
unset _orbit_root _orbit_src _c
