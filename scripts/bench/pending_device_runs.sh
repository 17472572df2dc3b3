#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 22), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
# 1. GPU tests not run after session 22's NVFP4 routing change (NVFP4 at 1-16 rows through
#    int4_mma): the GEMV / qmm kernel suites and exact mode (INT4 and NVFP4 cases), and the
#    quant-linear / engine tests with NVFP4 bases.
# 2. The INT4 mma kernel's Nsight profile (M = 4, 8) with the scale prefetch, to split the
#    missing 3-5 us between the per-step chain and the split-K tail (docs/kernels.md).
bash scripts/gpu_run.sh \
  "cmd:timeout 240 python3 -m pytest tests/gpu/test_kernels_gemv_gpu.py tests/gpu/test_kernels_qmm_gpu.py tests/gpu/test_exact_mode.py -m gpu -q -p no:cacheprovider -k 'int4 or nvfp4 or exact' 2>&1 | tail -6" \
  "cmd:timeout 200 python3 -m pytest tests/gpu/test_quant_linear_gpu.py tests/gpu/test_engine_gpu.py -m gpu -q -p no:cacheprovider -k nvfp4 2>&1 | tail -6" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4"
