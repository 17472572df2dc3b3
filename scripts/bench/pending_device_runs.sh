#!/usr/bin/env bash
# The measurements queued for the next device call (docs/benchmarks.md, "Session 19"), in
# priority order, as one call of the device tool from the repository root:
#     bash scripts/bench/pending_device_runs.sh
# Every switch below is off by default and gives the same bits as its off position; each
# bench line times the off and on positions in the same run (Qwen3-1.7B INT4, batch 1).
# The timeouts keep the whole batch under the device tool's 600 s per call.
set -uo pipefail
B="python3 scripts/bench/bench_engine.py --sections roofline --attn-backend triton"
F="grep -E '^roofline|rror' | tail -12"
# issue 3: the isolated plane GEMVs at the Qwen3-1.7B shapes, M = 1 and 4, without and with
# the scales as words (two runs: bench_qmm's --knob holds one value per run)
Q="python3 scripts/bench/bench_qmm.py --gemv --gemv-formats int4,nvfp4 --gemv-shapes 2048x2048,2048x4096,6144x2048,2048x12288 --gemv-m 1,4"
bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 -m pytest tests/gpu/test_norm_prologue_gpu.py tests/gpu/test_attention_decode_gpu.py tests/gpu/test_kernels_gemv_gpu.py -m gpu -q -x -p no:cacheprovider 2>&1 | tail -8" \
  "cmd:timeout 90 $B --knob orbit.kernels.gemv.PLANES_S_WORDS=False,True,False,True 2>&1 | $F" \
  "cmd:timeout 50 $B --knob orbit.kernels.gemv.PLANES_S_PREFETCH=False,True 2>&1 | $F" \
  "cmd:timeout 90 $B --fold-norm off,prologue --knob orbit.kernels.gemv.GEMV_STAGES=3,4,6 2>&1 | $F" \
  "cmd:timeout 60 $B --knob orbit.kernels.gemv.PLANES_BLOCK_K_M1_UNSPLIT=None,1024 2>&1 | $F" \
  "cmd:timeout 60 $B --knob orbit.kernels.attention_decode.KV_PRELOAD=False,True,False 2>&1 | $F" \
  "cmd:timeout 40 $Q 2>&1 | tail -8" \
  "cmd:timeout 40 $Q --knob orbit.kernels.gemv.PLANES_S_WORDS=True 2>&1 | tail -8"
