#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 22), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
# 0. The GPU tests of session 22's last change (a LoRA-carrying forward keeps its fused
#    kernel on the mma route's rows): the routing test and the LoRA decode tests.
# 1. What RL rollouts run: decode with the LoRA adapter active. On the mma route's rows
#    (INT4 2-8, NVFP4 1-16: _qgemm.MMA_ROWS) a LoRA-carrying forward keeps its fused-epilogue
#    kernel by default (_qgemm.MMA_WITH_LORA = False: the measured adapter-on path); True runs
#    the mma kernel and the delta as separate shrink / expand launches. The adapter-off engine
#    gained 7-37% from the route (session 22); if True wins with the adapter on, turn it on
#    (for the rows where it wins).
# 2. The INT4 mma kernel's Nsight profile (M = 4), to split the missing 3-5 us (against its
#    loads alone, bench_mma_loads.py) between the per-step chain and the split-K tail
#    (docs/kernels.md, "What the loads alone cost").
# 3. The engine test files not run whole since session 22's NVFP4 routing.
bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 -m pytest tests/gpu/test_int4_mma_gpu.py tests/gpu/test_lora_decode_gpu.py -m gpu -q -p no:cacheprovider -k 'routes or swiglu or gemv_epilogue or engine' 2>&1 | tail -6" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 1,4,16 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA=False,True 2>&1 | grep -vE '^\\{' | tail -14" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 4,8 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA=False,True 2>&1 | grep -vE '^\\{' | tail -10" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4" \
  "cmd:timeout 180 python3 -m pytest tests/gpu/test_engine_gpu.py tests/gpu/test_siblings_gpu.py tests/gpu/test_qmm_routes_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -6"
