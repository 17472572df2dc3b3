#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 21), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
# 1. GPU tests not run after session 21's routing change (INT4 at 2-8 rows now runs
#    int4_mma): the GEMV and qmm kernel suites' INT4 cases and exact mode.
# 2. The INT4 mma kernel's Nsight profile after the scale prefetch (M = 4, 8).
# 3. NVFP4 at M = 4 / 16, the formats goal still furthest off, to compare with a future
#    NVFP4 form of int4_mma (the E2M1 pair decode of plane_dot.py fits its layout).
bash scripts/gpu_run.sh \
  "cmd:timeout 240 python3 -m pytest tests/gpu/test_kernels_gemv_gpu.py tests/gpu/test_kernels_qmm_gpu.py tests/gpu/test_exact_mode.py -m gpu -q -p no:cacheprovider -k 'int4 or exact' 2>&1 | tail -6" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 8 2>&1 | tail -4" \
  "cmd:timeout 90 python3 scripts/bench/bench_qmm.py --gemv --gemv-formats nvfp4 --gemv-shapes 4096x12288,2048x12288,6144x2048 --gemv-m 4,16 --gemv-paths gemv,fused-dot 2>&1 | grep -vE '^\\{' | tail -16"
