#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 21), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
# 1. The NVFP4 form of int4_mma, written after session 21's device time ran out: its GPU
#    tests (one-hot rows must read the dequantized weights exactly), then NVFP4 at 2-8 rows
#    against the register-fed tile NVFP4 runs there now (_qgemm._regfed_by_rule; regfed-*
#    rows): if it wins, add "nvfp4" to _qgemm.MMA_FORMATS and run item 1's routing test
#    (test_qmm_routes_symmetric_int4_rows_to_the_mma_kernel covers NVFP4 when listed).
# 2. GPU tests not run after session 21's INT4 routing change: the GEMV and qmm kernel
#    suites' INT4 cases and exact mode.
# 3. The INT4 mma kernel's Nsight profile after the scale prefetch (M = 4, 8).
bash scripts/gpu_run.sh \
  "cmd:timeout 90 python3 -m pytest tests/gpu/test_int4_mma_gpu.py -m gpu -q -x -p no:cacheprovider 2>&1 | tail -6" \
  "cmd:timeout 150 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-regfed --gemv-formats nvfp4 --gemv-shapes 4096x12288,2048x12288,6144x2048,2048x4096 --gemv-m 4,8 --gemv-paths 'int4-mma,regfed-*' 2>&1 | grep -vE '^\\{' | tail -40" \
  "cmd:timeout 240 python3 -m pytest tests/gpu/test_kernels_gemv_gpu.py tests/gpu/test_kernels_qmm_gpu.py tests/gpu/test_exact_mode.py -m gpu -q -p no:cacheprovider -k 'int4 or exact' 2>&1 | tail -6" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4"
