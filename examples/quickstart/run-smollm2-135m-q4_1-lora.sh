#!/usr/bin/env bash
# Quickstart: GRPO with a LoRA adapter on SmolLM2-135M-Instruct, base frozen in its published
# Q4_1 GGUF form, on a generated arithmetic task. Runs on CPU or one GPU.
#
# The defaults are sized for a 2-core CPU: about 11 minutes launch to exit (48 steps of 16
# prompts x 8 samples, lr 1e-3 decayed to 1e-4 by a cosine; 12 steps, 13-18 minutes, on a CPU
# that trains in float32 without AVX-512), including a greedy pass@1 eval on 128 held-out
# prompts before the first step and after the last (docs/benchmarks.md,
# "Quickstart learning (CPU)", has the measured numbers). On a GPU, run it longer:
#   TOTAL_EPOCHS=3 NUM_ROLLOUT=170 ROLLOUT_BATCH_SIZE=32 EVAL_INTERVAL=34 DEVICE=cuda \
#     bash examples/quickstart/run-smollm2-135m-q4_1-lora.sh
#
#   bash examples/quickstart/run-smollm2-135m-q4_1-lora.sh
#   NUM_ROLLOUT=1 TRAIN_ROWS=1 ROLLOUT_BATCH_SIZE=1 N_SAMPLES_PER_PROMPT=1 GLOBAL_BATCH_SIZE=1 \
#     DISABLE_EVAL=1 ENABLE_WANDB=0 bash examples/quickstart/run-smollm2-135m-q4_1-lora.sh
#
# Every knob is an environment variable; examples/README.md lists them all.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
reject_megatron

SAVE_DIR="${SAVE_DIR:-$ORBIT_ROOT/runs/quickstart-smollm2-q4_1-lora}"

# Model: the embedded GGUF unless HF_CKPT points elsewhere (empty flag = embedded default).
CKPT_ARGS=(
  --hf-checkpoint "${HF_CKPT:-}"
  --save-interval "${SAVE_INTERVAL:-0}"
)

# The base stays in the GGUF's own precision (Q4_1 linears -> asymmetric int4, group 32).
PRECISION_ARGS=(
  --quant-format "${PRECISION_FORMAT:-auto}"
  --precision-mode "${PRECISION_MODE:-fast}"
  --qmm-routes "${QMM_ROUTES:-}"
  --compute-dtype "${COMPUTE_DTYPE:-auto}"
)

ADAPTER_ARGS=(
  --adapter lora
  --lora-rank "${LORA_RANK:-8}"
  --lora-alpha "${LORA_ALPHA:-16}"
)

# Sampling at 0.6, not 1.0: at 1.0 the 135M model rambles (half the samples hit the token
# limit) and gets 5% right against 18% greedy, so few groups carry a signal. Answers are
# ~10-15 tokens ("The answer is 52."), hence the 24-token limit (shorter = faster steps).
# 48 steps; 12 where the run would train in float32 on a CPU without AVX-512 (~80-100 s a
# step there; the helper says so on stderr). NUM_ROLLOUT always wins.
if [[ -z "${NUM_ROLLOUT:-}" ]]; then
  NUM_ROLLOUT="$(cd "$ORBIT_ROOT" && "$(orbit_python)" -m orbit.models.dtypes quickstart-steps \
      --device "${DEVICE:-auto}" --compute-dtype "${COMPUTE_DTYPE:-auto}")"
fi
overlap_flag >/dev/null; pdl_flag >/dev/null; fuse_lora_flag >/dev/null  # bad knobs stop here: set -e misses a $(...) inside an array
ROLLOUT_ARGS=(
  --rollout-temperature "${TEMPERATURE:-0.6}"
  --rollout-max-response-len "${MAX_RESPONSE_LEN:-24}"
  --max-prompt-len "${MAX_PROMPT_LEN:-256}"
  --n-samples-per-prompt "${N_SAMPLES_PER_PROMPT:-8}"
  --rollout-batch-size "${ROLLOUT_BATCH_SIZE:-16}"
  --num-rollout "$NUM_ROLLOUT"
  --rollout-attn-backend "${ROLLOUT_ATTN_BACKEND:-sdpa}"
  "$(overlap_flag)"
  "$(pdl_flag)"
  "$(fuse_lora_flag)"
)

# Train/test JSONL: generated into the run directory unless given.
GENERATE_DATA=0
if [[ -z "${TRAIN_JSONL:-}" || -z "${TEST_JSONL:-}" ]]; then
  GENERATE_DATA=1
  TRAIN_JSONL="${TRAIN_JSONL:-$SAVE_DIR/data/arithmetic-train.jsonl}"
  TEST_JSONL="${TEST_JSONL:-$SAVE_DIR/data/arithmetic-test.jsonl}"
fi
DATA_ARGS=(
  --prompt-data "$TRAIN_JSONL"
  --eval-prompt-data "$TEST_JSONL"
  --input-key prompt
  --label-key label
  --reward "${REWARD:-arithmetic,format=0.2}"
  --train-rows "${TRAIN_ROWS:-0}"
  --num-epoch "${TOTAL_EPOCHS:-1}"
  --seed "${SEED:-1234}"
)

ALGO_ARGS=(
  --advantage-estimator grpo
  --eps-clip 0.2
  --eps-clip-high 0.28
  --kl-coef "${KL_COEF:-0.0}"
)

OPTIM_ARGS=(
  --lr "${LR:-1e-3}"
  --lr-warmup-steps "${LR_WARMUP_STEPS:-1}"
  --lr-decay-style "${LR_DECAY_STYLE:-cosine}"
  --min-lr "${MIN_LR:-1e-4}"
  --global-batch-size "${GLOBAL_BATCH_SIZE:-0}"
  --max-tokens-per-micro-batch "${MAX_TOKENS_PER_MICRO_BATCH:-4096}"
  --clip-grad 1.0
)

# Greedy pass@1 (temperature 0, one sample) on every generated test row: a stable number,
# measured by the same code before the first step and after the last (and every
# EVAL_INTERVAL steps in between; the default interval only leaves those two).
EVAL_ARGS=(
  --eval-interval "${EVAL_INTERVAL:-1000}"
  --n-samples-per-eval-prompt "${EVAL_K:-1}"
  --eval-temperature "${EVAL_TEMPERATURE:-0}"
  --eval-rows "${EVAL_ROWS:-0}"
)
if [[ "${DISABLE_EVAL:-0}" == "1" ]]; then
  EVAL_ARGS+=(--disable-eval)
fi

LOG_ARGS=(
  --save "$SAVE_DIR"
  --use-wandb "$(wandb_setting)"
)

# One CPU worker gets every core: the Ray driver idles during a step, and on a 2-core host
# 2 torch threads train a step about 2x faster than the default share (cores minus one).
if [[ "${NUM_WORKERS:-0}" =~ ^[01]$ ]]; then
  DEFAULT_CPU_THREADS="$(nproc 2>/dev/null || echo 0)"
else
  DEFAULT_CPU_THREADS=0
fi
CLUSTER_ARGS=(
  --device "${DEVICE:-auto}"
  --num-workers "${NUM_WORKERS:-0}"
  "$(ray_flag)"
  --cpu-threads "${CPU_THREADS:-$DEFAULT_CPU_THREADS}"
)

if [[ "$GENERATE_DATA" == "1" && "${ORBIT_DRY_RUN_ARGV:-0}" != "1" ]]; then
  mkdir -p "$SAVE_DIR/data"
  (cd "$ORBIT_ROOT" && "$(orbit_python)" -m orbit.data.tasks arithmetic \
      --train-out "$TRAIN_JSONL" --test-out "$TEST_JSONL" \
      --n-train "${GEN_TRAIN_ROWS:-2048}" --n-test "${GEN_TEST_ROWS:-128}" --seed "${SEED:-1234}")
fi

orbit_launch "${CLUSTER_ARGS[@]}" "${CKPT_ARGS[@]}" "${PRECISION_ARGS[@]}" "${ADAPTER_ARGS[@]}" \
  "${ROLLOUT_ARGS[@]}" "${DATA_ARGS[@]}" "${ALGO_ARGS[@]}" "${OPTIM_ARGS[@]}" \
  "${EVAL_ARGS[@]}" "${LOG_ARGS[@]}"
