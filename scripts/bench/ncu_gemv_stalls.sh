#!/usr/bin/env bash
# Nsight Compute on the plane GEMV: duration, DRAM throughput and the warp stall reasons of
# each variant's 3 launches (scripts/bench/ncu_gemv.py), then the summary table. On the
# device, from the repository root:
#     bash scripts/bench/ncu_gemv_stalls.sh SHAPE VARIANTS [FMT] [M]
#     bash scripts/bench/ncu_gemv_stalls.sh 2048x4096 auto,l2_prefetch int4 1
# The CSV goes to $OUT (or /tmp) as ncu_gemv_SHAPE_FMT_mM.csv.
# FMT int4-mma profiles the Gluon mma.sync kernel instead (scripts/bench/ncu_int4_mma.py;
# VARIANTS are its configs: pick or warps:row_tiles:split:prefetch).
set -euo pipefail
SHAPE="${1:?shape, e.g. 2048x4096}"; VARIANTS="${2:-auto,l2_prefetch}"; FMT="${3:-int4}"; M="${4:-1}"
NCU="${NCU:-/usr/local/cuda/bin/ncu}"
CSV="${OUT:-/tmp}/ncu_gemv_${SHAPE}_${FMT}_m${M}.csv"
METRICS="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed"
METRICS+=",dram__bytes_read.sum,smsp__inst_executed.sum,launch__registers_per_thread"
for r in long_scoreboard barrier wait short_scoreboard mio_throttle lg_throttle \
         math_pipe_throttle not_selected selected no_instruction dispatch_stall \
         branch_resolving drain membar sleeping imc_miss misc; do
  METRICS+=",smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
done
N_VARIANTS=$(awk -F, '{print NF}' <<<"$VARIANTS")
if [ "$FMT" = int4-mma ]; then
  KERNEL=_int4_mma_kernel; DRIVER=(scripts/bench/ncu_int4_mma.py --m "$M" --configs "$VARIANTS")
else
  KERNEL=_gemv_planes; DRIVER=(scripts/bench/ncu_gemv.py --fmt "$FMT" --m "$M" --variants "$VARIANTS")
fi
"$NCU" --clock-control none --kernel-name "regex:$KERNEL" --launch-count $((3 * N_VARIANTS)) \
  --csv --log-file "$CSV" --metrics "$METRICS" \
  python3 "${DRIVER[@]}" --shape "$SHAPE"
python3 scripts/bench/ncu_gemv.py --summarize "$CSV" --variants "$VARIANTS"
