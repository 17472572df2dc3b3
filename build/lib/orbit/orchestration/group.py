"""A group of PolicyWorkers the driver talks to as one: in-process, or one Ray actor per device.

Both flavours expose the same methods, so the driver loop does not know whether it runs one
worker in its own process (tests, `--no-use-ray`) or N colocated actors. Work is split data
parallel: prompts by contiguous chunks for rollout and eval, samples by token count for
training (the workers all-reduce adapter gradients among themselves).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from orbit.config import TrainConfig
from orbit.orchestration.placement import (
    Placement,
    create_placement_group,
    free_port,
    init_process_group,
    resolve_placement,
    set_cpu_threads,
    start_ray,
)
from orbit.trainer.batching import seq_len


def split_chunks(items: list[Any], n: int) -> list[list[Any]]:
    """`items` in n contiguous chunks of near-equal size (order kept, so results concatenate)."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (i < r)
        out.append(items[start:end])
        start = end
    return out


def split_by_tokens(samples: list[Any], n: int) -> list[list[Any]]:
    """Greedy longest-first assignment to the least-loaded worker, so step time is balanced."""
    shards: list[list[Any]] = [[] for _ in range(n)]
    load = [0] * n
    order = sorted(range(len(samples)), key=lambda i: -seq_len(samples[i]))
    for i in order:
        w = min(range(n), key=lambda j: (load[j], j))
        shards[w].append(samples[i])
        load[w] += seq_len(samples[i])
    return shards


class WorkerActor:
    """The Ray actor: a thin shell that joins the process group and forwards calls."""

    def __init__(self, rank: int, world_size: int, device: str, threads: int) -> None:
        if device == "cpu":
            set_cpu_threads(threads)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.worker = None

    def free_port(self) -> int:
        return free_port()

    def setup(self, cfg: dict[str, Any], port: int, total_optim_steps: int) -> None:
        from orbit.trainer.worker import PolicyWorker

        init_process_group(self.rank, self.world_size, port, self.device)
        device = "cuda:0" if self.device == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        self.worker = PolicyWorker(TrainConfig.from_dict(cfg), rank=self.rank,
                                   world_size=self.world_size, device=device,
                                   total_optim_steps=total_optim_steps)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def teardown(self) -> None:
        import torch.distributed as dist

        if self.worker is not None:
            self.worker.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """N workers behind one interface; `call_all` runs a method on every worker."""

    def __init__(self, cfg: TrainConfig, total_optim_steps: int = 1) -> None:
        self.cfg = cfg
        self.total_optim_steps = total_optim_steps
        gpus = torch.cuda.device_count()
        self.placement: Placement = resolve_placement(cfg.cluster.device, cfg.cluster.num_workers,
                                                      gpus, os.cpu_count() or 1)
        # One core is left to Ray and the driver: on a small host, torch's OpenMP threads
        # spin-waiting against those processes made a CPU step ~20x slower (measured, 2 cores).
        self.threads = cfg.cluster.cpu_threads or max(1, self.placement.cpus_per_worker - 1)
        self._owns_ray = False
        self._local = None
        self._actors: list[Any] = []
        self._pg = None
        if cfg.cluster.use_ray:
            try:
                self._start_actors()
            except BaseException:
                self.shutdown()  # do not leave actors (or a Ray we started) behind
                raise
        else:
            if self.placement.num_workers != 1:
                raise ValueError("--no-use-ray runs exactly one worker; set --num-workers 1")
            from orbit.trainer.worker import PolicyWorker

            device = "cuda:0" if self.placement.device == "cuda" else "cpu"
            if device == "cpu":
                set_cpu_threads(self.threads)
            self._local = PolicyWorker(cfg, rank=0, world_size=1, device=device,
                                       total_optim_steps=total_optim_steps)

    def _start_actors(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = self.placement
        self._owns_ray = start_ray(self.cfg.cluster.ray_address,
                                   num_cpus=p.num_workers * p.cpus_per_worker)
        self._pg = create_placement_group(p)
        actor_cls = ray.remote(WorkerActor)
        for rank in range(p.num_workers):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=rank)
            self._actors.append(actor_cls.options(
                num_cpus=p.cpus_per_worker, num_gpus=1 if p.device == "cuda" else 0,
                scheduling_strategy=strategy,
            ).remote(rank, p.num_workers, p.device, self.threads))
        port = ray.get(self._actors[0].free_port.remote())
        ray.get([a.setup.remote(self.cfg.to_dict(), port, self.total_optim_steps) for a in self._actors])

    @property
    def size(self) -> int:
        return self.placement.num_workers

    def call_all(self, method: str, per_worker_args: list[tuple] | None = None, **kwargs: Any) -> list[Any]:
        """Run `method` on every worker (args per worker, or none) and return the results in rank order."""
        args = per_worker_args or [()] * self.size
        if self._local is not None:
            return [getattr(self._local, method)(*args[0], **kwargs)]
        import ray

        return ray.get([a.call.remote(method, *args[i], **kwargs) for i, a in enumerate(self._actors)])

    # ---- the steps the driver uses ------------------------------------------------------
    def rollout(self, rows: list[dict[str, Any]], step: int) -> list[Any]:
        shards = split_chunks(rows, self.size)
        return [s for part in self.call_all("rollout", [(c, step) for c in shards]) for s in part]

    def compute_old_logprobs(self, samples: list[Any]) -> None:
        """Record the pre-update policy's log-probs (needed when a rollout feeds >1 optimizer step)."""
        shards = split_chunks(samples, self.size)
        for shard, lps in zip(shards, self.call_all("compute_logprobs", [(c,) for c in shards])):
            for s, lp in zip(shard, lps):
                s.metadata["old_logprobs"] = lp

    def train(self, samples: list[Any]) -> dict[str, float]:
        """One optimizer step over a global batch, split across workers by token count."""
        total_tokens = sum(len(s.response_ids) for s in samples)
        shards = split_by_tokens(samples, self.size)
        results = self.call_all("train_step", [(s, total_tokens, len(samples)) for s in shards])
        return results[0]  # metrics are all-reduced inside train_step

    def push_adapter(self) -> float:
        return max(self.call_all("push_adapter"))

    def evaluate(self, rows: list[dict[str, Any]], step: int) -> list[list[float]]:
        shards = split_chunks(rows, self.size)
        return [r for part in self.call_all("evaluate", [(c, step) for c in shards]) for r in part]

    def save(self, ckpt_dir: str) -> None:
        self.call_all("save", [(ckpt_dir,)] * self.size)

    def load(self, ckpt_dir: str) -> None:
        self.call_all("load", [(ckpt_dir,)] * self.size)

    def shutdown(self) -> None:
        """Stop the actors, and Ray itself only if this group started it."""
        if self._local is not None:
            self._local.close()
            self._local = None
        if not self._actors and not self._owns_ray:
            return
        import ray

        if self._actors:
            try:
                ray.get([a.teardown.remote() for a in self._actors])
            finally:
                for a in self._actors:
                    ray.kill(a)
                self._actors = []
        if self._pg is not None:  # matters when attached to a cluster we do not own
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
