#!/usr/bin/env bash
# GRPO with an OFT adapter on Qwen3-4B-Instruct-2507, base frozen in BF16, on math (boxed answers).
#
#   HF_CKPT=/models/... TRAIN_JSONL=/data/math-train.jsonl TEST_JSONL=/data/math-test.jsonl bash high_precision/run-qwen3-4b-instruct-2507-bf16-math-oft.sh
#
# Every knob is an environment variable; examples/README.md lists them all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
reject_megatron
require_var HF_CKPT "Qwen3-4B-Instruct-2507 HF checkpoint dir"
require_var TRAIN_JSONL "train JSONL with 'prompt' and 'label' keys"

SAVE_DIR="${SAVE_DIR:-$ORBIT_ROOT/runs/qwen3-4b-instruct-2507-bf16-math-oft}"

CKPT_ARGS=(
  --hf-checkpoint "$HF_CKPT"
  --save-interval "${SAVE_INTERVAL:-20}"
)

PRECISION_ARGS=(
  --quant-format "${PRECISION_FORMAT:-bf16}"
  --quant-group-size "${QUANT_GROUP_SIZE:-128}"
  --precision-mode "${PRECISION_MODE:-fast}"
  --qmm-routes "${QMM_ROUTES:-}"
  --compute-dtype "${COMPUTE_DTYPE:-auto}"
)

ADAPTER_ARGS=(
  --adapter oft
  --oft-block-size "${OFT_BLOCK_SIZE:-32}"
)

overlap_flag >/dev/null; pdl_flag >/dev/null; fuse_lora_flag >/dev/null  # bad knobs stop here: set -e misses a $(...) inside an array
ROLLOUT_ARGS=(
  --rollout-temperature "${TEMPERATURE:-1.0}"
  --rollout-max-response-len "${MAX_RESPONSE_LEN:-4096}"
  --n-samples-per-prompt "${N_SAMPLES_PER_PROMPT:-8}"
  --rollout-batch-size "${ROLLOUT_BATCH_SIZE:-32}"
  --num-rollout "${NUM_ROLLOUT:-200}"
  --max-num-seqs "${MAX_NUM_SEQS:-256}"
  --rollout-attn-backend "${ROLLOUT_ATTN_BACKEND:-sdpa}"
  "$(overlap_flag)"
  "$(pdl_flag)"
  "$(fuse_lora_flag)"
)

DATA_ARGS=(
  --prompt-data "$TRAIN_JSONL"
  --eval-prompt-data "${TEST_JSONL:-}"
  --input-key "${INPUT_KEY:-prompt}"
  --label-key "${LABEL_KEY:-label}"
  --reward "${REWARD:-math}"
  --train-rows "${TRAIN_ROWS:-0}"
  --num-epoch "${TOTAL_EPOCHS:-1}"
  --seed "${SEED:-1234}"
)

ALGO_ARGS=(
  --advantage-estimator "${ADVANTAGE_ESTIMATOR:-grpo}"
  --eps-clip 0.2
  --eps-clip-high 0.28
  --kl-coef "${KL_COEF:-0.0}"
  --use-tis
)

OPTIM_ARGS=(
  --lr "${LR:-1e-4}"
  --lr-warmup-steps "${LR_WARMUP_STEPS:-5}"
  --lr-decay-style "${LR_DECAY_STYLE:-constant}"
  --min-lr "${MIN_LR:-0.0}"
  --global-batch-size "${GLOBAL_BATCH_SIZE:-64}"
  --max-tokens-per-micro-batch "${MAX_TOKENS_PER_MICRO_BATCH:-16384}"
  --clip-grad 1.0
)

EVAL_ARGS=(
  --eval-interval "${EVAL_INTERVAL:-20}"
  --n-samples-per-eval-prompt "${EVAL_K:-4}"
)
if [[ "${DISABLE_EVAL:-0}" == "1" || -z "${TEST_JSONL:-}" ]]; then
  EVAL_ARGS+=(--disable-eval)
fi

LOG_ARGS=(
  --save "$SAVE_DIR"
  --use-wandb "$(wandb_setting)"
)

CLUSTER_ARGS=(
  --device "${DEVICE:-auto}"
  --num-workers "${NUM_WORKERS:-0}"
  "$(ray_flag)"
)

orbit_launch "${CLUSTER_ARGS[@]}" "${CKPT_ARGS[@]}" "${PRECISION_ARGS[@]}" "${ADAPTER_ARGS[@]}" \
  "${ROLLOUT_ARGS[@]}" "${DATA_ARGS[@]}" "${ALGO_ARGS[@]}" "${OPTIM_ARGS[@]}" \
  "${EVAL_ARGS[@]}" "${LOG_ARGS[@]}"
