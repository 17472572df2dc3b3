"""The RL training loop, top to bottom: read this file to know what a step does.

    prompts -> rollout (engine, serve slot) -> rewards -> advantages (whole batch)
            -> optimizer step(s) on the train slot -> push adapter into the serve slot
            -> log, evaluate, checkpoint

Workers are colocated (trainer and engine share one model per device); see group.py for how
work is split across them, and orbit/trainer/worker.py for what each step does on a device.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from orbit.alignment.monitor import MismatchMonitor
from orbit.config import TrainConfig
from orbit.data.jsonl import PromptIterator, PromptRecord, load_prompts
from orbit.eval.passk import pass_at_k_table
from orbit.orchestration.group import WorkerGroup
from orbit.orchestration.steps import (
    assign_advantages,
    drop_failed_samples,
    mini_batches,
    reduce_train_metrics,
    rollout_metrics,
)
from orbit.trainer import checkpoint as ckpt
from orbit.trainer.metrics import MetricsLogger, wandb_enabled


def _mismatch_view(metrics: dict) -> dict[str, float]:
    """The step's train-vs-rollout metrics under the names MismatchMonitor watches."""
    names = {"mean_abs": "train/train_rollout_logprob_abs_diff_mean",
             "max_abs": "train/train_rollout_logprob_abs_diff_max",
             "kl_k3": "train/train_rollout_kl_k3"}
    return {k: float(metrics[v]) for k, v in names.items() if v in metrics}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training as configured; returns the run directory."""
    cfg.validate()
    run_dir = Path(cfg.logging.save)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")  # the resolved config, re-loadable with TrainConfig.load

    # 1. Data: prompts rendered with the model's chat template; train as a resumable iterator.
    train_set, test_set = _load_data(cfg)
    stream = PromptIterator(train_set, cfg.rollout.rollout_batch_size, seed=cfg.data.seed,
                            shuffle=cfg.data.rollout_shuffle)
    test_rows = _rows(test_set.records, first_group=0) if test_set else []
    num_steps = cfg.num_steps(len(train_set))
    optim_steps_per_rollout = cfg.samples_per_step() // cfg.global_batch()

    # 2. Metrics sinks, then the workers: one per GPU (or CPU worker), each loads the base,
    #    injects the adapter and builds its engine.
    logger = MetricsLogger(run_dir, num_steps, use_wandb=wandb_enabled(cfg.logging.use_wandb),
                           wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
                           run_name=cfg.logging.run_name, config=cfg.to_dict())
    workers = WorkerGroup(cfg, total_optim_steps=num_steps * optim_steps_per_rollout)
    # Warns when the train-vs-rollout log-prob gap jumps (exact mode: when it is ever nonzero).
    monitor = MismatchMonitor(exact=cfg.precision.precision_mode == "exact")
    try:
        # 3. Resume: adapter, optimizer, RNG and data position from the latest checkpoint.
        start = _resume(cfg, run_dir, workers, stream, logger)
        if test_rows and start == 0:
            logger.log(0, _evaluate(cfg, workers, test_rows, 0))

        for step in range(start + 1, num_steps + 1):
            t_step = time.perf_counter()
            # 4. Rollout: n samples per prompt from the serve slot, scored by the reward runner.
            first_group = step * cfg.rollout.rollout_batch_size
            rows = _rows(stream.next_batch(), first_group=first_group)
            samples = workers.rollout(rows, step)
            t_rollout = time.perf_counter() - t_step
            # A prompt the engine refused (empty, longer than the context) leaves the step with
            # a warning instead of failing it; only a step where every prompt failed raises.
            rolled = len(samples)
            samples = drop_failed_samples(samples, first_group)
            metrics = rollout_metrics(samples)
            metrics["rollout/failed_samples"] = float(rolled - len(samples))

            # 5. Advantages over the whole batch (group baselines, or batch whitening).
            assign_advantages(samples, cfg.algo)

            # 6. Optimizer steps on the train slot, one per global batch. With more than one,
            #    later ones are off-policy: record the sampling policy's log-probs first.
            t0 = time.perf_counter()
            if optim_steps_per_rollout > 1:
                workers.compute_old_logprobs(samples)
            per_step = [workers.train(mb) for mb in mini_batches(samples, cfg.global_batch(),
                                                                 partial=len(samples) < rolled)]
            metrics |= reduce_train_metrics(per_step)
            t_train = time.perf_counter() - t0
            jumps = monitor.update(step, _mismatch_view(metrics))
            for jump in jumps:
                logger.console.print(f"[yellow]warning:[/] {jump.message()}")
            metrics["train/mismatch_jumps"] = len(jumps)

            # 7. Weight sync: copy the adapter's train slot into the engine's serve slot.
            t_push = workers.push_adapter()

            step_time = time.perf_counter() - t_step
            metrics |= {
                "perf/rollout_time": t_rollout, "perf/train_time": t_train,
                "perf/push_adapter_time": t_push, "perf/step_time": step_time,
                "perf/tokens_per_s": sum(len(s.prompt_ids) + len(s.response_ids) for s in samples) / step_time,
                "perf/rollout_tokens_per_s": sum(len(s.response_ids) for s in samples) / t_rollout,
            }

            # 8. Evaluate, log, checkpoint.
            if test_rows and (step % cfg.eval.eval_interval == 0 or step == num_steps):
                metrics |= _evaluate(cfg, workers, test_rows, step)
            logger.log(step, metrics)
            if step == num_steps or (cfg.ckpt.save_interval and step % cfg.ckpt.save_interval == 0):
                _save(cfg, run_dir, workers, stream, step)
    finally:
        workers.shutdown()
        logger.close(plot=cfg.logging.plot)
    return run_dir


def _load_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train PromptDataset, test PromptDataset or None); the tokenizer renders chat templates."""
    from orbit.models.tokenizer import load_tokenizer

    d = cfg.data
    tok = load_tokenizer(cfg.ckpt.hf_checkpoint or _default_model_path()) if d.apply_chat_template else None

    def load(path: str, limit: int) -> Any:
        return load_prompts(path, d.input_key, d.label_key or None, tokenizer=tok,
                            apply_chat_template=d.apply_chat_template, limit=limit or None)

    eval_on = not cfg.eval.disable_eval and bool(d.eval_prompt_data)
    return load(d.prompt_data, d.train_rows), (load(d.eval_prompt_data, cfg.eval.eval_rows) if eval_on else None)


def _rows(records: list[PromptRecord], first_group: int) -> list[dict[str, Any]]:
    """What workers get: rendered prompt text, label, and a group id unique within the run."""
    return [{"text": r.text, "label": r.label, "group_id": first_group + i} for i, r in enumerate(records)]


def _resume(cfg: TrainConfig, run_dir: Path, workers: WorkerGroup, stream: PromptIterator,
            logger: MetricsLogger) -> int:
    """Restore the latest checkpoint, if any and if asked; returns the last completed step."""
    last = ckpt.latest_checkpoint(run_dir) if cfg.ckpt.resume else None
    if last is None:
        return 0
    state = ckpt.load_driver(last)
    workers.load(str(last))
    stream.load_state_dict(state["data"])
    logger.truncate_after(state["step"])
    logger.console.print(f"resumed from {last} (step {state['step']})")
    return int(state["step"])


def _evaluate(cfg: TrainConfig, workers: WorkerGroup, rows: list[dict[str, Any]], step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    per_prompt = workers.evaluate(rows, step)
    out = {f"eval/{k}": v for k, v in pass_at_k_table(per_prompt, [1, cfg.eval.n_samples_per_eval_prompt]).items()}
    out["perf/eval_time"] = time.perf_counter() - t0
    return out


def _save(cfg: TrainConfig, run_dir: Path, workers: WorkerGroup, stream: PromptIterator, step: int) -> None:
    """Atomic checkpoint: workers write into a temp dir, the driver adds its state, then commit."""
    tmp = ckpt.begin(run_dir, step)
    workers.save(str(tmp))
    ckpt.save_driver(tmp, {"step": step, "data": stream.state_dict()})
    ckpt.commit(tmp, step, keep=cfg.ckpt.keep_checkpoints)


def _default_model_path() -> str:
    from orbit.assets import default_gguf_path

    return str(default_gguf_path())
