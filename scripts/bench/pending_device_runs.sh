#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/gpu_prepare.sh                          (here, once: .whl/ with pytest-xdist)
#     run(command="bash scripts/bench/pending_device_runs.sh t", carry=[".whl"])
#     then a, f, g, e; b (the whole GPU suite, 14 xdist workers, ~550 s) after kernel changes
#     (b1-b3: the same files in three calls, without xdist)
# Ran in session 34: n (NVFP4 two steps ahead: shipped; FP8 lost), h16 (the M = 16 pick is the
# best of its neighbourhood), a PDL-off profile timeline. Ran in session 35: t (315 passed), w
# (four row tiles lose), a (pick_decode within 4% of the best), g (NVFP4 at 17-32 rows:
# shipped), f (FP8's best kw form: 2 warps over N, 3 steps ahead; not yet in the engine).
# Session 36 got no device (every start refused). Next: v (or its short form vs: the wgmma
# kernel's GPU tests and bench_wgmma.py), v2 (the engine with it routed), x (FP8's kw deep form,
# int4_mma.KW_DEEP_FORM, in the engine and the kernel tests), e.
# x: FP8 at 2-8 rows with 8-warp programs 3 steps ahead (KW_DEEP_FORM) against the shipped
#    one-step form, two pairs; then the kernel's GPU tests with it on; then the RL adapter's
#    case of session 35's FP8 route (LoRA r16: every shape on the mma kernel from 5 rows, its
#    delta in separate launches) against the deep-only rule, not measured with an adapter yet.
# t: the tensor-core kernel's GPU tests under session 34's default (NVFP4 two steps ahead at
#    1-8 rows; its kw form with prefetch 2 passed test_warps_along_k in session 33).
# a: batch-1 decode attention at short contexts (96 / 192 / 320 positions): every split and
#    launch config against pick_decode (4.32 us a layer in the PDL-off profile, 121 us a step).
# f: FP8 weight-only decode: the FP8 GEMV / loop against the tensor-core kernel's kw pick with
#    1 / 2 / 3 steps ahead at M = 1-16, the table kept in $OUT/f/bench_qmm.json (6144x2048 M = 4: 11.8 /
#    13.5 / 10.8 us at 1 / 2 / 3 steps; the route's loop 16.2).
# g: NVFP4 at 17-32 rows (INT4 took them in session 31: +5-8% at batch 24-32): the engine
#    with MMA_ROWS nvfp4 (1, 16) vs (1, 32), and the isolated kernel against its routes.
# w: INT4 at 8 / 12 / 16 rows with two or four 16-row tiles a warp (x shared by 64 weight rows: half
#    the two-tile pick's L2 reads of x), kw 4 / 8, prefetch 1 / 2; the 8 fastest per shape.
# v: the INT4 / NVFP4 wgmma kernel for rollout rows (orbit/kernels/int4_wgmma.py, new): its GPU
#    tests, then bench_wgmma.py (Qwen3-1.7B shapes, M 32-256: cuBLAS BF16, the route,
#    dequantize + cuBLAS, the pick and, for INT4, its neighbours).
# vs: v's short form (the default-config, one-hot and route tests; both formats at M 64 / 256).
# v2: the engine with INT4 and NVFP4 on it at 33-256 rows (WGMMA_ROWS) against the shipped
#    routes, two pairs at batch 64 / 128 / 256; the GPU tests that cross those rows with it on.
# e: FP8 at rollout sizes through the route tuner (FP8 M 64/128/256: not tuned yet).
set -uo pipefail
# kw_sweep SHAPES MS LOG: the kw neighbourhood on one device call, the 10 fastest per shape and M
kw_sweep() {
  bash scripts/gpu_run.sh \
  "cmd:timeout 540 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw sweep --gemv-formats int4 --gemv-shapes $1 --gemv-m $2 --gemv-paths 'int4-mma*,gemv' > \$OUT/$3 2>&1; grep '^{' \$OUT/$3 | python3 -c 'import json,sys,itertools; rs=sorted((json.loads(l) for l in sys.stdin), key=lambda r: (r[\"k\"], r[\"n\"], r[\"m\"], r[\"ms\"])); [print(k, n, m, r[\"path\"], round(r[\"ms\"]*1e3,2), r[\"cfg\"]) for (k, n, m), g in itertools.groupby(rs, key=lambda r: (r[\"k\"], r[\"n\"], r[\"m\"])) for r in list(g)[:10]]'"
}
case "${1:-d}" in
d) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw deep --gemv-formats int4 --gemv-shapes 2048x4096,2048x2048,2048x12288,6144x2048,4096x12288 --gemv-m 1,4,8 --gemv-paths 'int4-mma*' 2>&1 | grep '^{' | python3 scripts/bench/rows.py fmt k n m cfg ms speedup frac_copy_bw" \
  "cmd:timeout 120 python3 scripts/bench/bench_engine.py --sections formats --formats int4 --batches 1,4,8 --attn-backend triton --knob orbit.kernels.int4_mma.KW_DEEP_PREFETCH_STEPS=2,3,2,3 2>&1 | grep '^formats'" \
  "cmd:timeout 120 python3 scripts/bench/pytest_with_knobs.py orbit.kernels.int4_mma.KW_DEEP_PREFETCH_STEPS=3 -- tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider -k default_config 2>&1 | tail -2" ;;
n) bash scripts/gpu_run.sh \
  "cmd:timeout 400 python3 scripts/bench/bench_engine.py --sections formats --formats nvfp4,fp8 --batches 1,2,4,8 --new-tokens 512 --attn-backend triton --knob \"orbit.kernels.int4_mma.KW_DEEP_PREFETCH_MAX_M={'int4':8},{'int4':8,'nvfp4':8,'fp8':8},{'int4':8},{'int4':8,'nvfp4':8,'fp8':8}\" 2>&1 | grep '^formats'" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 585 python3 -m pytest tests/gpu -m gpu -q -p no:cacheprovider -n 14 --durations=15 > \$OUT/gpu.log 2>&1; grep -E '^(FAILED|ERROR)|passed|failed' \$OUT/gpu.log | tail -25" ;;
b1) bash scripts/gpu_run.sh \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_qmm_gpu.py -k 'plane_pair_steps or swap_ab_forward or tile_dequantization' > \$OUT/b1a.log 2>&1; tail -3 \$OUT/b1a.log" \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_oft_kernel.py tests/gpu/test_quant_linear_gpu.py tests/gpu/test_rmsnorm_gpu.py tests/gpu/test_rope_gpu.py tests/gpu/test_moe_gemm_gpu.py > \$OUT/b1b.log 2>&1; tail -3 \$OUT/b1b.log" ;;
b2) bash scripts/gpu_run.sh \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_kernels_gemv_gpu.py tests/gpu/test_kernels_sample_gpu.py tests/gpu/test_kv_write_gpu.py tests/gpu/test_models_attention_gpu.py > \$OUT/b2a.log 2>&1; tail -3 \$OUT/b2a.log" \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_l2_prefetch_gpu.py tests/gpu/test_gemv_chain_gpu.py > \$OUT/b2b.log 2>&1; tail -3 \$OUT/b2b.log" ;;
b3) bash scripts/gpu_run.sh \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_int4_mma_gpu.py -k 'not default_config' > \$OUT/b3a.log 2>&1; tail -3 \$OUT/b3a.log" \
  "cmd:timeout 280 python3 -m pytest -m gpu -q -p no:cacheprovider tests/gpu/test_exact_mode.py tests/gpu/test_attention_decode_gpu.py > \$OUT/b3b.log 2>&1; tail -3 \$OUT/b3b.log" ;;
h) kw_sweep 4096x12288 4,8,16 h.log ;;
t) bash scripts/gpu_run.sh \
  "cmd:timeout 300 python3 -m pytest tests/gpu/test_int4_mma_gpu.py tests/gpu/test_mma_swiglu_gpu.py -m gpu -q -p no:cacheprovider -n 14 2>&1 | tail -3" ;;
a) bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 scripts/bench/bench_attn_decode.py --sweep --batches 1,4 --contexts 96,192,320 > \$OUT/attn.log 2>&1; grep '^{' \$OUT/attn.log | python3 scripts/bench/rows.py B live split block_n warps prefetch auto us" ;;
f) bash scripts/gpu_run.sh \
  "cmd:mkdir -p \$OUT/f; timeout 200 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw deep --gemv-formats fp8 --gemv-shapes 4096x12288,2048x12288,6144x2048,2048x4096 --gemv-m 1,2,4,8,16 --out \$OUT/f > \$OUT/f.log 2>&1; grep '^{' \$OUT/f.log | python3 scripts/bench/rows.py path k n m cfg ms speedup frac_copy_bw" ;;
w) bash scripts/gpu_run.sh \
  "cmd:timeout 420 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw wide --gemv-formats int4 --gemv-shapes 4096x12288,2048x12288 --gemv-m 8,12,16 --gemv-paths 'int4-mma*' > \$OUT/w.log 2>&1; grep '^{' \$OUT/w.log | python3 -c 'import json,sys,itertools; rs=sorted((json.loads(l) for l in sys.stdin), key=lambda r: (r[\"k\"], r[\"n\"], r[\"m\"], r[\"ms\"])); [print(k, n, m, r[\"path\"], round(r[\"ms\"]*1e3,2), round(r[\"speedup\"],3), r[\"cfg\"]) for (k, n, m), g in itertools.groupby(rs, key=lambda r: (r[\"k\"], r[\"n\"], r[\"m\"])) for r in list(g)[:8]]'" ;;
x) bash scripts/gpu_run.sh \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections formats --formats fp8 --batches 2,4,8 --new-tokens 256 --attn-backend triton --knob \"orbit.kernels.int4_mma.KW_DEEP_PREFETCH_MAX_M={'int4':8,'nvfp4':8},{'int4':8,'nvfp4':8,'fp8':8},{'int4':8,'nvfp4':8},{'int4':8,'nvfp4':8,'fp8':8}\" 2>&1 | grep decode | sed 's/.*MAX_M=//'" \
  "cmd:timeout 150 python3 scripts/bench/pytest_with_knobs.py \"orbit.kernels.int4_mma.KW_DEEP_PREFETCH_MAX_M={'int4':8,'nvfp4':8,'fp8':8}\" -- tests/gpu/test_int4_mma_gpu.py -m gpu -q -p no:cacheprovider -n 14 2>&1 | tail -2" \
  "cmd:timeout 200 python3 scripts/bench/bench_engine.py --sections lora --lora-format fp8 --fuse-lora on --batches 2,4,8 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_MIN_K_OVER_N={'fp8':3},{},{'fp8':3},{}\" 2>&1 | grep -E 'b[0-9]+ *:' | sed 's/.*MIN_K_OVER_N=//'" ;;
v) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 -m pytest tests/gpu/test_int4_wgmma_gpu.py -m gpu -q -p no:cacheprovider -x -n 12 2>&1 | tail -15" \
  "cmd:mkdir -p \$OUT/v; timeout 170 python3 scripts/bench/bench_wgmma.py --formats int4 --shapes 2048x12288,6144x2048,2048x4096 --m 64,128,256 --out \$OUT/v > \$OUT/v.log 2>&1; grep -v '^{' \$OUT/v.log | tail -14" \
  "cmd:mkdir -p \$OUT/v4; timeout 80 python3 scripts/bench/bench_wgmma.py --formats nvfp4 --shapes 2048x12288,6144x2048,2048x4096 --m 64,128,256 --no-sweep --out \$OUT/v4 > \$OUT/v4.log 2>&1; grep -v '^{' \$OUT/v4.log | tail -12" ;;
vs) bash scripts/gpu_run.sh \
  "cmd:timeout 120 python3 -m pytest tests/gpu/test_int4_wgmma_gpu.py -m gpu -q -p no:cacheprovider -x -n 12 -k 'default_config or one_hot or route' 2>&1 | tail -8" \
  "cmd:mkdir -p \$OUT/v; timeout 150 python3 scripts/bench/bench_wgmma.py --formats int4,nvfp4 --shapes 2048x12288,6144x2048,2048x4096 --m 64,256 --out \$OUT/v > \$OUT/v.log 2>&1; grep -v '^{' \$OUT/v.log | tail -14" ;;
v2) bash scripts/gpu_run.sh \
  "cmd:timeout 240 python3 scripts/bench/bench_engine.py --sections formats --formats int4,nvfp4 --batches 64,128,256 --new-tokens 128 --attn-backend triton --knob \"orbit.kernels._qgemm.WGMMA_ROWS={},{'int4':(33,256),'nvfp4':(33,256)},{},{'int4':(33,256),'nvfp4':(33,256)}\" 2>&1 | grep decode | sed 's/.*WGMMA_ROWS=//'" \
  "cmd:timeout 300 python3 scripts/bench/pytest_with_knobs.py \"orbit.kernels._qgemm.WGMMA_ROWS={'int4':(33,256),'nvfp4':(33,256)}\" -- tests/gpu/test_quant_linear_gpu.py tests/gpu/test_lora_decode_gpu.py tests/gpu/test_engine_gpu.py tests/gpu/test_siblings_gpu.py tests/gpu/test_kernels_qmm_gpu.py -m gpu -q -p no:cacheprovider -n 14 2>&1 | tail -4" ;;
h16) bash scripts/gpu_run.sh \
  "cmd:timeout 120 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw deep --gemv-formats int4 --gemv-shapes 4096x12288,2048x12288 --gemv-m 12,16 --gemv-paths 'int4-mma*' 2>&1 | grep -v '^{' | tail -30" ;;
e) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats fp8 --m 64,128,256 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
g) bash scripts/gpu_run.sh \
  "cmd:timeout 150 python3 scripts/bench/bench_engine.py --sections formats --formats nvfp4 --batches 24,32 --attn-backend triton --knob \"orbit.kernels._qgemm.MMA_ROWS={'int4':(1,32),'nvfp4':(1,16),'fp8':(4,8)},{'int4':(1,32),'nvfp4':(1,32),'fp8':(4,8)}\" 2>&1 | grep decode | tail -4" \
  "cmd:timeout 120 python3 scripts/bench/bench_qmm.py --gemv --gemv-mma --gemv-mma-kw --gemv-formats nvfp4 --gemv-shapes 4096x12288,6144x2048,2048x4096 --gemv-m 24,32 --gemv-paths 'int4-mma*,fused-dot,dequant' 2>&1 | grep '^{' | python3 scripts/bench/rows.py path fmt k n m cfg ms speedup frac_copy_bw" ;;
*) echo "usage: $0 v|vs|v2|t|w|x|a|f|g|e|b|b1|b2|b3|d|n|h16|h" >&2; exit 2 ;;
esac
