#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh b     (then f, c, d, e)
# a: (ran in session 29) two MMA chains and staged x: measured, off.
# b: the whole GPU suite under the session-30 defaults (int4_mma.WARP_K = 8, INT4 on the mma
#    route from 1 row), in two halves (session 30 ran the int4_mma, route and engine tests
#    only: 97 passed). Output goes to $OUT so a timeout still leaves the log. Then the
#    batch-1 roofline section three times (session 30 ran it once, at WARP_K 4).
# c: warps along K isolated on the other Qwen3 shapes (2048x12288, 2048x2048) and M = 8.
# f: the kernel at 17-32 rows (MAX_M 32 since session 30: 32 MMA columns, compiled and
#    tested offline, never run): the GPU tests at those rows, isolated against cuBLAS, and
#    the engine (plain and LoRA r16) at batch 24 / 32 with INT4's route to 16 and to 32 rows.
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
b) bash scripts/gpu_run.sh \
  "cmd:timeout 290 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider --ignore=tests/gpu/test_int4_mma_gpu.py --ignore=tests/gpu/test_engine_gpu.py -k 'not lora and not chain' > \$OUT/gpu_a.log 2>&1; tail -3 \$OUT/gpu_a.log" \
  "cmd:timeout 290 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider --ignore=tests/gpu/test_int4_mma_gpu.py --ignore=tests/gpu/test_engine_gpu.py -k 'lora or chain' > \$OUT/gpu_b.log 2>&1; tail -3 \$OUT/gpu_b.log" \
  "cmd:for i in 1 2 3; do timeout 60 python3 scripts/bench/bench_engine.py --sections roofline --attn-backend triton 2>&1 | grep '^roofline'; done" ;;
c) bash scripts/gpu_run.sh \
  "cmd:timeout 250 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw --gemv-formats int4,nvfp4 --gemv-shapes 2048x12288,2048x2048 --gemv-m 1,4,8,16 --gemv-paths 'int4-mma*,gemv' 2>&1 | grep '^{' | python3 scripts/bench/rows.py path fmt k n m cfg ms speedup frac_copy_bw" ;;
d) cp orbit/kernels/tuned/nvidia_h100_80gb_hbm3.json "$OUT/routes.json"
  bash scripts/gpu_run.sh \
  "cmd:timeout 380 python3 -m orbit tune-qmm --model qwen3-1.7b --formats int4 --m 24,32,48 --out $OUT/routes.json --update 2>&1 | grep -E ' us |routes|rror' | tail -30" \
  "cmd:ORBIT_QMM_ROUTES=$OUT/routes.json timeout 130 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format int4 --fuse-lora on --batches 24,32,48 --attn-backend triton --knob \"orbit.adapters.lora_decode.PLAIN_ROWS={},{'int4':(17,63)}\" 2>&1 | grep decode | tail -12" ;;
e) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats fp8 --m 64,128,256 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
f) bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 -m pytest tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider -k 'default_config' > \$OUT/gpu_f.log 2>&1; tail -3 \$OUT/gpu_f.log" \
  "cmd:timeout 120 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw --gemv-formats int4 --gemv-shapes 4096x12288,6144x2048,2048x4096 --gemv-m 24,32 --gemv-paths 'int4-mma*,fused-dot' 2>&1 | grep '^{' | python3 scripts/bench/rows.py path fmt k n m cfg ms speedup frac_copy_bw" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 24,32 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_ROWS={'int4':(1,16),'nvfp4':(1,16),'fp8':(4,8)},{'int4':(1,32),'nvfp4':(1,16),'fp8':(4,8)}\" 2>&1 | grep decode | tail -4" \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections lora --adapter-kinds lora --lora-format int4 --fuse-lora on --batches 24,32 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_ROWS={'int4':(1,16),'nvfp4':(1,16),'fp8':(4,8)},{'int4':(1,32),'nvfp4':(1,16),'fp8':(4,8)}\" 2>&1 | grep decode | tail -8" ;;
*) echo "usage: $0 b|c|d|e|f" >&2; exit 2 ;;
esac
