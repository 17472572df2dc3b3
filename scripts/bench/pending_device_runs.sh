#!/usr/bin/env bash
# The measurements queued for the next device calls (docs/benchmarks.md), in priority order,
# each call within the device tool's 600 s, from the repository root:
#     bash scripts/bench/pending_device_runs.sh a     (then b)
# a: INT4 at 17-63 rows through the route tuner (the H100 table tunes 1-16 and 64+; session
#    27 found the INT4 LoRA groups slower than the plain forward there on the rules' tile, so
#    lora_decode.PLAIN_ROWS sends those rows to the plain forward). Then merge the routes
#    (`tune-qmm --update`) and rerun the LoRA engine at b24-48 with PLAIN_ROWS off and on; drop
#    the rule if the groups win on the tuned tiles. Also the route table's GPU tests (not run
#    since session 26's merge).
# b: FP8 at rollout sizes through the route tuner (FP8 M 64/128/256: not tuned yet).
set -uo pipefail
case "${1:-a}" in
a) bash scripts/gpu_run.sh \
  "cmd:timeout 80 python3 -m pytest tests/gpu/test_qmm_routes_gpu.py -m gpu -q -p no:cacheprovider 2>&1 | grep -E '^E |Error|FAILED|passed|failed' | tail -5" \
  "cmd:timeout 400 python3 -m orbit tune-qmm --model qwen3-1.7b --formats int4 --m 24,32,48 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
b) bash scripts/gpu_run.sh \
  "cmd:timeout 500 python3 -m orbit tune-qmm --model qwen3-1.7b --formats fp8 --m 64,128,256 --out \$OUT/routes.json 2>&1 | grep -E ' us |routes' | tail -22" ;;
*) echo "usage: $0 a|b" >&2; exit 2 ;;
esac
