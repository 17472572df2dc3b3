#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b, c, d)
# a: session 25's change, measured once (NVFP4 b64/256, INT4 b256: +23-29%) but its GPU tests
#    not passed: LoRA decode groups serve any row count (the expand-add in 64-row blocks). The
#    kernel test rewritten against exact sums (its 100-row case failed against cuBLAS by 6e-4)
#    and the engine test (fused vs plain log-probs, prefill chunks of 120-260 rows now in the
#    groups) have not run on a GPU; then the adapter-on engine against the old cap
#    (orbit.adapters.lora_decode.MAX_ROWS = the format's dequantize threshold - 1) for the
#    rows not yet measured (INT4 b64, NVFP4 b32, FP8 b128/256).
# b: quantized sibling groups at dequantize + cuBLAS rows (orbit.quant.linear.
#    SIBLING_FROM_DEQUANT, shipped on without a GPU measurement): the engine at rollout batches
#    with it off and on, adapter off and LoRA, INT4 and NVFP4; turn it off if it loses.
# c, d: the route tuner at rollout row counts (INT4 64-256, NVFP4 32-256; member and stacked
#    sibling shapes): whether a tl.dot tile
#    beats dequantize + cuBLAS there (it would also let the LoRA delta fold into the base
#    launch). routes.json comes back in $OUT; merge into orbit/kernels/tuned/ by hand
#    (`tune-qmm --update` semantics: per format, shape and M).
set -uo pipefail
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 240 python3 -m pytest tests/gpu/test_lora_decode_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_siblings_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -20" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 64,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=63,None 2>&1 | grep -vE '^\\{' | grep -v oft | grep 'decode'" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 32,64,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=31,None 2>&1 | grep -vE '^\\{' | grep -v oft | grep 'decode'" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --lora-format fp8 --fuse-lora on --batches 128,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=127,None 2>&1 | grep -vE '^\\{' | grep -v oft | grep 'decode'" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format int4 --fuse-lora on --batches 64,256 --attn-backend triton --knob orbit.quant.linear.SIBLING_FROM_DEQUANT=False,True 2>&1 | grep -vE '^\\{' | grep -v oft | grep 'decode'" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format nvfp4 --fuse-lora on --batches 64,256 --attn-backend triton --knob orbit.quant.linear.SIBLING_FROM_DEQUANT=False,True 2>&1 | grep -vE '^\\{' | grep -v oft | grep 'decode'" ;;
c) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats int4 --m 64,128,256 --out \$OUT/routes.json 2>&1 | tail -22" ;;
d) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats nvfp4 --m 32,64,256 --out \$OUT/routes.json 2>&1 | tail -22" ;;
esac
