#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b)
# a: session 23's last change, not yet run on a GPU: fast mode's per-format dequantize +
#    cuBLAS thresholds (_qgemm.DEQUANT_MIN_M_BY_FMT). The GPU tests it touches, the engine
#    with the shipped table against the loop at 32-256 rows, and the adapter-on engine (what
#    RL rollouts run) at 64 and 256.
# b: session 22's queue: the LoRA decode tests of MMA_WITH_LORA, the adapter-on engine with
#    the mma route (MMA_WITH_LORA True) against without, and the INT4 mma kernel's Nsight
#    profile (M = 4).
# c: session 24's int4_mma with programmatic dependent launch (MmaConfig.pdl, USE_PDL): its
#    GPU tests, the per-GEMM rows (int4-mma-pdl against int4-mma, graphed), and the engine's
#    INT4 / NVFP4 decode at 1-16 rows with USE_PDL off and on.
# d: session 24's FP8 deep-K mma rule (_qgemm.MMA_MIN_K_OVER_N): the engine's FP8 decode at
#    2-8 rows with an "fp8" MMA_ROWS entry (then only the down projections take the mma
#    kernel) against without, and the int4_mma GPU tests' FP8 rows.
set -uo pipefail
TABLE="{'nvfp4':32,'int4':64,'fp8':128}"
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 220 python3 -m pytest tests/gpu/test_lora_decode_gpu.py tests/gpu/test_qmm_routes_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_kernels_qmm_gpu.py tests/gpu/test_quant_linear_gpu.py tests/gpu/test_exact_mode.py -m gpu -q -p no:cacheprovider 2>&1 | tail -8" \
  "cmd:timeout 130 python3 scripts/bench/bench_engine.py --sections formats --formats int4,fp8,nvfp4 --batches 32,64,128,256 --attn-backend triton --knob \"orbit.kernels._qgemm.DEQUANT_MIN_M_BY_FMT={},$TABLE\" 2>&1 | grep -vE '^\\{' | tail -26" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 64,256 --attn-backend triton --knob \"orbit.kernels._qgemm.DEQUANT_MIN_M_BY_FMT={},$TABLE\" 2>&1 | grep -vE '^\\{' | tail -8" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 120 python3 -m pytest tests/gpu/test_lora_decode_gpu.py -m gpu -q -p no:cacheprovider -k 'routes or swiglu or gemv_epilogue or engine' 2>&1 | tail -6" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 1,4,16 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA=False,True 2>&1 | grep -vE '^\\{' | tail -14" \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4" ;;
c) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 -m pytest tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -5" \
  "cmd:timeout 200 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-formats int4,nvfp4 --gemv-shapes 4096x12288,2048x12288,6144x2048 --gemv-m 1,4,16 --gemv-paths 'int4-mma*' 2>&1 | grep -vE '^\\{' | tail -70" \
  "cmd:timeout 180 python3 scripts/bench/bench_engine.py --sections formats --formats int4,nvfp4 --batches 1,4,8,16 --attn-backend triton --knob orbit.kernels.int4_mma.USE_PDL=False,True 2>&1 | grep -vE '^\\{' | tail -20" ;;
d) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections formats --formats fp8 --batches 2,4,8,16 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_ROWS={'int4':(2,8),'nvfp4':(1,16)},{'int4':(2,8),'nvfp4':(1,16),'fp8':(2,8)},{'int4':(2,8),'nvfp4':(1,16)},{'int4':(2,8),'nvfp4':(1,16),'fp8':(2,8)}\" 2>&1 | grep -vE '^\\{' | tail -20" ;;
esac
