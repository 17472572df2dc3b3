"""The quickstart launcher's one-step smoke run on CPU: generated data, embedded SmolLM2 Q4_1
GGUF, LoRA, Ray with one worker; it must finish and leave metrics, config and a checkpoint.
About 40 s on a 2-core host (under the 60 s that would make it `slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE = {"NUM_ROLLOUT": "1", "TOTAL_EPOCHS": "1", "TRAIN_ROWS": "1", "ROLLOUT_BATCH_SIZE": "1",
         "N_SAMPLES_PER_PROMPT": "1", "GLOBAL_BATCH_SIZE": "1", "DISABLE_EVAL": "1", "ENABLE_WANDB": "0"}


def test_quickstart_smoke_on_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_CKPT", "TRAIN_JSONL", "TEST_JSONL", "MEGATRON_LOAD")}
    env.update(SMOKE, SAVE_DIR=str(tmp_path / "run"), CUDA_VISIBLE_DEVICES="",
               GEN_TRAIN_ROWS="16", GEN_TEST_ROWS="4")
    if sys.prefix != sys.base_prefix and "ORBIT_VENV" not in env:
        env["ORBIT_VENV"] = sys.prefix  # the launcher runs the environment these tests run in
    r = subprocess.run(["bash", str(ROOT / "examples/quickstart/run-smollm2-135m-q4_1-lora.sh")],
                       env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]
    m = rows[0]
    for key in ("rollout/reward_mean", "rollout/response_len_mean", "train/pg_loss", "train/grad_norm",
                "train/train_rollout_logprob_abs_diff_mean", "perf/step_time", "perf/push_adapter_time"):
        assert key in m, key
    assert m["rollout/num_samples"] == 1
    assert (run / "data" / "arithmetic-train.jsonl").is_file()
    assert json.loads((run / "config.json").read_text())["ckpt"]["hf_checkpoint"] == ""
    assert (run / "checkpoints" / "step_000001" / "adapter" / "adapter_model.safetensors").is_file()
    print(f"quickstart CPU step time: {m['perf/step_time']:.2f} s "
          f"(rollout {m['perf/rollout_time']:.2f} s, train {m['perf/train_time']:.2f} s)")
