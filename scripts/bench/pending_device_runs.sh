#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b)
# a: session 24's last change, not yet run on a GPU: LoRA forwards on the mma route from
#    _qgemm.MMA_WITH_LORA_MIN_M (5) rows. The GPU tests it touches, and the adapter-on engine
#    at 2-8 rows with the shipped threshold against never (17) for INT4 and FP8; then the
#    tl.dot loop's in-kernel LoRA shrink as row-of-A programs past 8 rows
#    (_qgemm.LOOP_SHRINK_DOT_MIN_M: the suspected critical path at 5-64 rows), FP8 and INT4.
# b: the INT4 mma kernel's Nsight profile at M = 4 (with PDL now), and the adapter-on engine at
#    rollout batch sizes (64, 256) for every quantized format.
set -uo pipefail
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 300 python3 -m pytest tests/gpu/test_int4_mma_gpu.py tests/gpu/test_lora_decode_gpu.py tests/gpu/test_engine_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | tail -5" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 2,4,6,8 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA_MIN_M=17,5 2>&1 | grep -vE '^\\{' | grep 'lora r16'" \
  "cmd:timeout 100 python3 scripts/bench/bench_engine.py --sections lora --lora-format fp8 --fuse-lora on --batches 4,8 --attn-backend triton --knob orbit.kernels._qgemm.MMA_WITH_LORA_MIN_M=17,5 2>&1 | grep -vE '^\\{' | grep 'lora r16'" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections lora --lora-format fp8 --fuse-lora on --batches 6,8,16,32 --attn-backend triton --knob orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8,16,32,64 2>&1 | grep -vE '^\\{' | grep 'lora r16'" \
  "cmd:timeout 100 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 16,32 --attn-backend triton --knob orbit.kernels._qgemm.LOOP_SHRINK_DOT_MIN_M=8,16,32 2>&1 | grep -vE '^\\{' | grep 'lora r16'" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 60 bash scripts/bench/ncu_gemv_stalls.sh 4096x12288 pick int4-mma 4 2>&1 | tail -4" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 64,256 --attn-backend triton 2>&1 | grep -vE '^\\{' | tail -8" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 64,256 --attn-backend triton 2>&1 | grep -vE '^\\{' | tail -8" ;;
esac
