#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b)
# a: the FP8 form of int4_mma (session 23, never run yet): its GPU tests, the kernel against
#    the FP8 GEMV / tl.dot loop / cuBLAS at 1-16 rows on five Qwen3 shapes, and Qwen3-1.7B FP8
#    decode with FP8 on the mma route (1-16 rows) against without, one process; then the
#    rollout batch sizes (64, 256 sequences: the RL regime, where the quantized bases decoded
#    at 0.4-0.6x the BF16 one, docs/benchmarks.md) with dequantize + cuBLAS from 64 rows
#    (_qgemm.DEQUANT_MIN_M) against the tl.dot loop (1024), one process.
# b: rollout batch sizes per GEMM (bench_qmm --mid: the tl.dot loop against dequantize +
#    cuBLAS at 16-256 rows), then session 22's queue: the LoRA decode tests of MMA_WITH_LORA, the adapter-on engine with
#    the mma route (MMA_WITH_LORA True) against without, the FP8 config sweep, and the
#    engine test files.
set -uo pipefail
ROWS_OFF="{'int4':(2,8),'nvfp4':(1,16)}"
ROWS_FP8="{'int4':(2,8),'nvfp4':(1,16),'fp8':(1,16)}"
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 -m pytest tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider -x 2>&1 | tail -15" \
  "cmd:timeout 190 python3 scripts/bench/bench_engine.py --sections formats --formats int4,fp8,nvfp4 --batches 64,256 --attn-backend triton --knob orbit.kernels._qgemm.DEQUANT_MIN_M=1024,64 2>&1 | grep -vE '^\\{' | tail -16" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections formats --formats fp8 --batches 1,4,8,16 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_ROWS=$ROWS_OFF,$ROWS_FP8\" 2>&1 | grep -vE '^\\{' | tail -14" \
  "cmd:timeout 120 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-formats fp8 --gemv-shapes 4096x12288,2048x12288,6144x2048,2048x4096,2048x2048 --gemv-m 1,4,8,16 --gemv-paths gemv,fused-dot,int4-mma --out \$OUT/fp8 2>&1 | grep -vE '^\\{' | tail -70" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 scripts/bench/bench_qmm.py --mid --gemv-formats int4,fp8,nvfp4 --mid-m 16,32,64,128,256 --out \$OUT/mid 2>&1 | grep -vE '^\\{' | tail -40" \
  "cmd:timeout 120 python3 -m pytest tests/gpu/test_lora_decode_gpu.py -m gpu -q -p no:cacheprovider -k 'routes or swiglu or gemv_epilogue or engine' 2>&1 | tail -6" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 1,4,16 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA=False,True 2>&1 | grep -vE '^\\{' | tail -14" \
  "cmd:timeout 130 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-sweep --gemv-formats fp8 --gemv-shapes 4096x12288,6144x2048 --gemv-m 4,16 --gemv-paths int4-mma --out \$OUT/fp8sweep 2>&1 | grep -vE '^\\{' | tail -12" \
  "cmd:timeout 140 python3 -m pytest tests/gpu/test_engine_gpu.py tests/gpu/test_qmm_routes_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -6" ;;
esac
