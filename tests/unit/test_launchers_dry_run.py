"""Every launcher's ORBIT_DRY_RUN_ARGV=1 argv parses with the real train argparser; required
variables and the unbuilt megatron backend stop the launcher with a message naming them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orbit.config import TrainConfig, parse_args

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = "examples/quickstart/run-smollm2-135m-q4_1-lora.sh"
QWEN = [
    "examples/high_precision/run-qwen3-4b-instruct-2507-bf16-math-oft.sh",
    "examples/low_precision/run-qwen3-4b-fp8-math-oft.sh",
    "examples/low_precision/run-qwen3-4b-int4-math-lora.sh",
    "examples/low_precision/run-qwen3-4b-nvfp4-math-lora.sh",
]
# knobs a user may have exported; cleared so each test sees only what it sets
KNOBS = ("HF_CKPT", "TRAIN_JSONL", "TEST_JSONL", "MEGATRON_LOAD", "SAVE_DIR", "ENABLE_WANDB", "NUM_ROLLOUT",
         "TOTAL_EPOCHS", "TRAIN_ROWS", "ROLLOUT_BATCH_SIZE", "N_SAMPLES_PER_PROMPT", "GLOBAL_BATCH_SIZE",
         "DISABLE_EVAL", "LR", "LORA_RANK", "OFT_BLOCK_SIZE", "MAX_RESPONSE_LEN", "ORBIT_VENV",
         "USE_RAY", "LR_DECAY_STYLE", "MIN_LR", "ROLLOUT_OVERLAP", "ROLLOUT_ATTN_BACKEND",
         "ROLLOUT_PDL", "ROLLOUT_FUSE_LORA", "DEVICE", "COMPUTE_DTYPE")


def run(script: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in KNOBS}
    full.update({"ORBIT_DRY_RUN_ARGV": "1", "HOME": str(home)}, **env)
    return subprocess.run(["bash", str(ROOT / script)], env=full, capture_output=True, text=True,
                          timeout=60, check=False)


def parsed(out: str) -> TrainConfig:
    argv = out.splitlines()
    assert argv[1:3] == ["-m", "orbit.train"], argv[:3]
    return parse_args(argv[3:])


@pytest.mark.parametrize("script", [QUICKSTART, *QWEN])
def test_dry_run_argv_parses(script: str, tmp_path: Path) -> None:
    r = run(script, tmp_path, HF_CKPT="/models/qwen3-4b", TRAIN_JSONL="/data/train.jsonl",
            TEST_JSONL="/data/test.jsonl")
    assert r.returncode == 0, r.stderr
    cfg = parsed(r.stdout)
    cfg.validate()
    assert cfg.ckpt.hf_checkpoint == "/models/qwen3-4b"
    assert cfg.data.prompt_data == "/data/train.jsonl" and cfg.data.eval_prompt_data == "/data/test.jsonl"
    assert cfg.logging.use_wandb == "0"  # no $HOME/.wandb_key
    assert not (tmp_path / "runs").exists()


def test_knobs_reach_the_argv(tmp_path: Path) -> None:
    r = run(QWEN[2], tmp_path, HF_CKPT="/m", TRAIN_JSONL="/t.jsonl", NUM_ROLLOUT="7", TOTAL_EPOCHS="3",
            TRAIN_ROWS="11", ROLLOUT_BATCH_SIZE="6", N_SAMPLES_PER_PROMPT="4", GLOBAL_BATCH_SIZE="12",
            LR="3e-6", LORA_RANK="8", MAX_RESPONSE_LEN="100", SAVE_DIR=str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    cfg = parsed(r.stdout)
    assert (cfg.rollout.num_rollout, cfg.data.num_epoch, cfg.data.train_rows) == (7, 3, 11)
    assert (cfg.rollout.rollout_batch_size, cfg.rollout.n_samples_per_prompt, cfg.optim.global_batch_size) == (6, 4, 12)
    assert cfg.optim.lr == 3e-6 and cfg.adapter.lora_rank == 8 and cfg.rollout.rollout_max_response_len == 100
    assert cfg.logging.save == str(tmp_path / "s") and cfg.precision.quant_format == "int4"
    assert cfg.eval.disable_eval  # no TEST_JSONL
    oft = parsed(run(QWEN[0], tmp_path, HF_CKPT="/m", TRAIN_JSONL="/t", OFT_BLOCK_SIZE="64").stdout)
    assert oft.adapter.adapter == "oft" and oft.adapter.oft_block_size == 64


def test_quickstart_defaults_need_nothing(tmp_path: Path) -> None:
    # A fresh run directory: the README's main command may already have generated data in the
    # default one, and the point here is that a dry run generates nothing.
    r = run(QUICKSTART, tmp_path, DISABLE_EVAL="1", SAVE_DIR=str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    cfg = parsed(r.stdout)
    assert cfg.ckpt.hf_checkpoint == ""  # the embedded GGUF
    assert cfg.data.prompt_data.endswith("arithmetic-train.jsonl") and cfg.eval.disable_eval
    assert not Path(cfg.data.prompt_data).exists()  # a dry run generates nothing


@pytest.mark.parametrize("setting", ["auto", "0", "1"])
def test_enable_wandb(setting: str, tmp_path: Path) -> None:
    (tmp_path / ".wandb_key").write_text("not-a-real-key\n")
    cfg = parsed(run(QUICKSTART, tmp_path, ENABLE_WANDB=setting).stdout)
    assert cfg.logging.use_wandb == {"auto": "1", "0": "0", "1": "1"}[setting]


@pytest.mark.parametrize("script", QWEN)
@pytest.mark.parametrize("missing", ["HF_CKPT", "TRAIN_JSONL"])
def test_missing_required_variable(script: str, missing: str, tmp_path: Path) -> None:
    env = {"HF_CKPT": "/m", "TRAIN_JSONL": "/t.jsonl"}
    del env[missing]
    r = run(script, tmp_path, **env)
    assert r.returncode != 0 and missing in r.stderr and r.stdout == ""


@pytest.mark.parametrize("script", [QUICKSTART, QWEN[0]])
def test_megatron_load_is_refused_clearly(script: str, tmp_path: Path) -> None:
    r = run(script, tmp_path, HF_CKPT="/m", TRAIN_JSONL="/t", MEGATRON_LOAD="/megatron/ckpt")
    assert r.returncode != 0 and "not built yet" in r.stderr and "MEGATRON_LOAD" in r.stderr


def test_bad_enable_wandb_value(tmp_path: Path) -> None:
    r = run(QUICKSTART, tmp_path, ENABLE_WANDB="yes")
    assert r.returncode != 0 and "ENABLE_WANDB" in r.stderr


@pytest.mark.parametrize("script", [QUICKSTART, *QWEN])
def test_use_ray_knob(script: str, tmp_path: Path) -> None:
    env = {"HF_CKPT": "/m", "TRAIN_JSONL": "/t.jsonl"}
    assert "--use-ray" in run(script, tmp_path, **env).stdout.splitlines()
    assert "--no-use-ray" in run(script, tmp_path, USE_RAY="0", **env).stdout.splitlines()
    r = run(script, tmp_path, USE_RAY="maybe", **env)
    assert r.returncode != 0 and "USE_RAY" in r.stderr


def test_lr_decay_knobs(tmp_path: Path) -> None:
    argv = run(QUICKSTART, tmp_path, LR_DECAY_STYLE="linear", MIN_LR="1e-5").stdout.splitlines()
    assert argv[argv.index("--lr-decay-style") + 1] == "linear"
    assert argv[argv.index("--min-lr") + 1] == "1e-5"
    # the quickstart's measured recipe: cosine from 1e-3 to 1e-4 over 48 steps (on a GPU; a
    # float32 CPU without AVX-512 gets 12: test_quickstart_steps_follow_the_host)
    argv = run(QUICKSTART, tmp_path, DEVICE="cuda").stdout.splitlines()
    assert argv[argv.index("--lr-decay-style") + 1] == "cosine"
    assert argv[argv.index("--min-lr") + 1] == "1e-4"
    assert argv[argv.index("--num-rollout") + 1] == "48"



def test_quickstart_steps_follow_the_host(tmp_path: Path) -> None:
    from orbit.models.dtypes import FULL_QUICKSTART_STEPS, slow_cpu_reason

    def steps(**env: str) -> str:
        argv = run(QUICKSTART, tmp_path, **env).stdout.splitlines()
        return argv[argv.index("--num-rollout") + 1]

    assert steps(NUM_ROLLOUT="5") == "5"
    assert steps(DEVICE="cuda") == steps(DEVICE="cpu", COMPUTE_DTYPE="bf16") == "48"
    host = steps(DEVICE="cpu", COMPUTE_DTYPE="float32")
    assert host == ("48" if slow_cpu_reason("cpu", "float32") is None else "12")
    assert FULL_QUICKSTART_STEPS == 48
    r = run(QUICKSTART, tmp_path, DEVICE="xpu")
    assert r.returncode != 0 and "--device" in r.stderr


@pytest.mark.parametrize("script", [QUICKSTART, *QWEN])
def test_rollout_engine_knobs(script: str, tmp_path: Path) -> None:
    env = {"HF_CKPT": "/m", "TRAIN_JSONL": "/t.jsonl"}
    cfg = parsed(run(script, tmp_path, **env).stdout)
    assert cfg.rollout.rollout_overlap and cfg.rollout.rollout_attn_backend == "sdpa"
    assert cfg.rollout.rollout_pdl and cfg.rollout.rollout_fuse_lora
    cfg = parsed(run(script, tmp_path, ROLLOUT_OVERLAP="0", ROLLOUT_ATTN_BACKEND="triton",
                     ROLLOUT_PDL="0", ROLLOUT_FUSE_LORA="0", **env).stdout)
    assert not cfg.rollout.rollout_overlap and cfg.rollout.rollout_attn_backend == "triton"
    assert not cfg.rollout.rollout_pdl and not cfg.rollout.rollout_fuse_lora
    r = run(script, tmp_path, ROLLOUT_OVERLAP="yes", **env)
    assert r.returncode != 0 and "ROLLOUT_OVERLAP" in r.stderr
    r = run(script, tmp_path, ROLLOUT_PDL="2", **env)
    assert r.returncode != 0 and "ROLLOUT_PDL" in r.stderr
    r = run(script, tmp_path, ROLLOUT_FUSE_LORA="on", **env)
    assert r.returncode != 0 and "ROLLOUT_FUSE_LORA" in r.stderr
