#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, session 20), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# The timeouts keep the whole batch under the device tool's 600 s per call. First the GPU
# tests of the kernels edited after the last device call (session 20's removals).
set -uo pipefail
B="python3 scripts/bench/bench_engine.py --sections roofline --attn-backend triton"
F="grep -E '^roofline|rror' | tail -12"
# Then: the unsplit M = 1 rule (+6% for INT4 in session 18) for NVFP4 and FP8, never measured
# there; the stall profile of the down shape; issue 3's isolated INT4 / NVFP4 GEMVs.
bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 -m pytest tests/gpu/test_attention_decode_gpu.py tests/gpu/test_norm_prologue_gpu.py tests/gpu/test_kernels_gemv_gpu.py -m gpu -q -x -p no:cacheprovider -k 'decode or engine or fixup or deferred' 2>&1 | tail -4" \
  "cmd:timeout 60 $B --fold-norm off,prologue,off,prologue 2>&1 | $F" \
  "cmd:timeout 90 python3 scripts/bench/bench_engine.py --sections formats --formats nvfp4 --batches 1 --attn-backend triton --knob \"orbit.kernels.gemv.PLANES_M1_UNSPLIT_FORMATS=('int4',),('int4','nvfp4'),('int4',),('int4','nvfp4')\" 2>&1 | grep -E 'tok/s|rror' | tail -6" \
  "cmd:timeout 90 python3 scripts/bench/bench_engine.py --sections formats --formats fp8 --batches 1 --attn-backend triton --knob orbit.kernels.gemv_fp8.FP8_M1_UNSPLIT=False,True,False,True 2>&1 | grep -E 'tok/s|rror' | tail -6" \
  "cmd:timeout 80 bash scripts/bench/ncu_gemv_stalls.sh 6144x2048 auto,l2_prefetch 2>&1 | tail -8" \
  "cmd:timeout 40 python3 scripts/bench/bench_qmm.py --gemv --gemv-formats int4,nvfp4 --gemv-shapes 4096x12288,2048x4096 --gemv-m 1,4,16 --gemv-paths gemv,fused-dot 2>&1 | grep -vE '^\\{' | tail -16"
