#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 22), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
# 1. The INT4 mma kernel's Nsight profile (M = 4, 8) with the scale prefetch, to split the
#    missing 3-5 us (against its loads alone, bench_mma_loads.py) between the per-step chain
#    and the split-K tail (docs/kernels.md, "What the loads alone cost").
# 2. The engine test files not run since session 22's NVFP4 routing (NVFP4 at 1-16 rows
#    through int4_mma): every GPU test file with an engine in it, whole.
bash scripts/gpu_run.sh \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 8 2>&1 | tail -4" \
  "cmd:timeout 420 python3 -m pytest tests/gpu/test_engine_gpu.py tests/gpu/test_lora_decode_gpu.py tests/gpu/test_siblings_gpu.py tests/gpu/test_qmm_routes_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -6"
