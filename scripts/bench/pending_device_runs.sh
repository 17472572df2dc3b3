#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh b     (then c, d, e; a ran in session 29)
# a: (ran in session 29, docs/benchmarks.md) the GPU tests of two MMA chains per step
#    (MmaConfig.chains) and x staged in shared memory (MmaConfig.x_smem), and both against
#    the register form isolated on 4096x12288 at M = 1, 4, 16.
# b: the engine at batch 1-16 with int4_mma.MMA_CHAINS / NVFP4_MMA_CHAINS 1 and 2, and with
#    X_SMEM_MIN_M 17 (never) and 1. Turn on what wins.
# c: both isolated on the other Qwen3 shapes.
# d: INT4 at 17-63 rows through the route tuner (the H100 table tunes 1-16 and 64+; the
#    rows 17-63 fall in the 64-row bucket and the INT4 LoRA groups are slower than the plain
#    forward there, so lora_decode.PLAIN_ROWS sends them to the plain forward, measured again
#    in session 28). The tuner runs `--update` on a copy of the shipped table; merge it
#    (copy $OUT/routes.json over orbit/kernels/tuned/nvidia_h100_80gb_hbm3.json) and rerun the
#    LoRA engine at b24-48 with PLAIN_ROWS off and on; drop the rule if the groups win.
#    H100 only (the table is the H100's).
# e: FP8 at rollout sizes through the route tuner (FP8 M 64/128/256: not tuned yet).
set -uo pipefail
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 220 python3 -m pytest tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider -k 'chains or x_staged' 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -8" \
  "cmd:timeout 150 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-xsmem --gemv-formats int4,nvfp4 --gemv-shapes 4096x12288 --gemv-m 1,4,16 --gemv-paths 'int4-mma*,gemv,gemv-pdl' 2>&1 | grep '^{' | python3 scripts/bench/rows.py path k n m cfg ms speedup frac_copy_bw" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 110 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 2,4,8 --attn-backend triton --knob orbit.kernels.int4_mma.MMA_CHAINS=1,2 2>&1 | grep decode | tail -6" \
  "cmd:timeout 110 python3 scripts/bench/bench_engine.py --sections formats --formats nvfp4 --batches 1,4,8,16 --attn-backend triton --knob orbit.kernels.int4_mma.NVFP4_MMA_CHAINS=1,2 2>&1 | grep decode | tail -8" \
  "cmd:timeout 110 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 2,4,8 --attn-backend triton --knob orbit.kernels.int4_mma.X_SMEM_MIN_M=17,1 2>&1 | grep decode | tail -6" \
  "cmd:timeout 110 python3 scripts/bench/bench_engine.py --sections formats --formats nvfp4 --batches 1,4,8,16 --attn-backend triton --knob orbit.kernels.int4_mma.X_SMEM_MIN_M=17,1 2>&1 | grep decode | tail -8" ;;
c) bash scripts/gpu_run.sh \
  "cmd:timeout 250 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-xsmem --gemv-formats int4,nvfp4 --gemv-shapes 6144x2048,2048x12288,2048x4096,2048x2048 --gemv-m 1,4,8,16 --gemv-paths 'int4-mma*,gemv' 2>&1 | grep '^{' | python3 scripts/bench/rows.py path k n m cfg ms speedup frac_copy_bw" ;;
d) cp orbit/kernels/tuned/nvidia_h100_80gb_hbm3.json "$OUT/routes.json"
  bash scripts/gpu_run.sh \
  "cmd:timeout 380 python3 -m orbit tune-qmm --model qwen3-1.7b --formats int4 --m 24,32,48 --out $OUT/routes.json --update 2>&1 | grep -E ' us |routes|rror' | tail -30" \
  "cmd:ORBIT_QMM_ROUTES=$OUT/routes.json timeout 130 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format int4 --fuse-lora on --batches 24,32,48 --attn-backend triton --knob \"orbit.adapters.lora_decode.PLAIN_ROWS={},{'int4':(17,63)}\" 2>&1 | grep decode | tail -12" ;;
e) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats fp8 --m 64,128,256 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
*) echo "usage: $0 a|b|c|d|e" >&2; exit 2 ;;
esac
