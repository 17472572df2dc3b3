#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b, c)
# a: the H100 route table's rollout-size routes (session 26: tune-qmm INT4 M 64/128/256, NVFP4
#    M 32/64/256, merged without an engine run): the engine at rollout batches with the table
#    against the rules (which the old table equalled past 16 rows), and the table's GPU tests;
#    then the adapter-on engine (LoRA groups, OFT) under the table.
#    Also oft.STACKED_BASE (shipped off: the q/k/v and gate/up bases of OFT linears as one
#    launch at batch 1-2), True first. (Session 26's OFT rotation groups moved to p.)
# b: the adapter-on engine against the old LoRA cap (orbit.adapters.lora_decode.MAX_ROWS = the
#    format's dequantize threshold - 1) for the rows not yet measured (INT4 b64, NVFP4 b32, FP8
#    b128/256).
# c: FP8 at rollout sizes through the route tuner (FP8 M 64/128/256: not tuned yet).
# p: session 27's in-kernel L2 prefetch (Engine(prefetch_weights=True): each decode attention
#    launch prefetches its layer's o_proj + MLP weights into L2): its GPU tests, the engine
#    off/on at batch 1/16/64, the issuing launch (l2_prefetch.WHERE) at batch 1; int4_mma's
#    K-slice L2 prefetch (MmaConfig.l2) against the pick, with and without PDL.
# q: the OFT sibling rotation groups' GPU tests and engine comparison (session 26, from a).
set -uo pipefail
case "${1:-a}" in
p) bash scripts/gpu_run.sh \
  "cmd:timeout 170 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 1,16,64 --attn-backend triton --prefetch-weights both 2>&1 | grep -v '^{' | grep 'decode'" \
  "cmd:timeout 100 python3 -m pytest tests/gpu/test_l2_prefetch_gpu.py tests/gpu/test_int4_mma_gpu.py -k 'prefetch or l2_slice' -m gpu -q -p no:cacheprovider 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -5" \
  "cmd:timeout 100 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-l2 --gemv-formats int4 --gemv-shapes 4096x12288,2048x12288,6144x2048 --gemv-m 4,16 --gemv-paths 'int4-mma*' 2>&1 | grep '^{' | python3 scripts/bench/rows.py fmt path k n m cfg ms speedup frac_copy_bw" \
  "cmd:timeout 80 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 1 --attn-backend triton --prefetch-weights on --knob \"orbit.rollout.l2_prefetch.WHERE='attention','rope'\" 2>&1 | grep -v '^{' | grep 'decode'" ;;
a) bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections formats --formats int4,nvfp4 --batches 32,64,128,256 --attn-backend triton --qmm-routes-compare --qmm-routes orbit/kernels/tuned/nvidia_h100_80gb_hbm3.json 2>&1 | grep -v '^{' | grep 'decode'" \
  "cmd:timeout 80 python3 -m pytest tests/gpu/test_qmm_routes_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -5" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format int4 --fuse-lora on --batches 32,64,128 --attn-backend triton 2>&1 | grep -v '^{' | grep 'decode'" \
  "cmd:timeout 90 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds oft --lora-format int4 --batches 1,2 --attn-backend triton --knob orbit.adapters.oft.STACKED_BASE=True,False 2>&1 | grep -v '^{' | grep 'decode'" ;;
q) bash scripts/gpu_run.sh \
  "cmd:timeout 90 python3 -m pytest tests/gpu/test_oft_kernel.py tests/gpu/test_engine_gpu.py -m gpu -q -p no:cacheprovider -k 'group or oft' 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -5" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds oft --lora-format int4 --batches 1,4,64 --attn-backend triton --knob orbit.adapters.oft.GROUP_ROTATIONS=False,True 2>&1 | grep -v '^{' | grep 'decode'" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format int4 --fuse-lora on --batches 64,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=63,None 2>&1 | grep -v '^{' | grep 'decode'" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format nvfp4 --fuse-lora on --batches 32,64,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=31,None 2>&1 | grep -v '^{' | grep 'decode'" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format fp8 --fuse-lora on --batches 128,256 --attn-backend triton --knob orbit.adapters.lora_decode.MAX_ROWS=127,None 2>&1 | grep -v '^{' | grep 'decode'" ;;
c) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats fp8 --m 64,128,256 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
*) echo "usage: $0 a|b|c" >&2; exit 2 ;;
esac
