"""Ray bring-up and placement: which device each worker gets, and the process group they join.

Orbit is colocated: every worker actor holds one GPU (or a share of the CPUs) and runs both the
trainer and the rollout engine on it. A placement group reserves all bundles up front so the
workers start together or not at all. torch.distributed is initialised inside the actors with a
TCP store on 127.0.0.1 and a free port (single node), NCCL on GPU and gloo on CPU; only adapter
gradients ever travel over it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Placement:
    """How many workers, on what, with how many CPU threads each."""

    device: str  # "cuda" | "cpu"
    num_workers: int
    cpus_per_worker: int


def resolve_device(device: str, available_gpus: int) -> str:
    """`--device` ("auto", "cpu", "cuda") -> "cpu" or "cuda": auto = cuda when a GPU is visible.
    (Whether "cuda" has a GPU to run on is resolve_placement's check.)"""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if available_gpus > 0 else "cpu"
    return device


def resolve_placement(device: str, num_workers: int, available_gpus: int, available_cpus: int) -> Placement:
    """Pick device and worker count: one worker per GPU, or `num_workers` CPU workers (default 1)."""
    device = resolve_device(device, available_gpus)
    if device == "cuda":
        if available_gpus == 0:
            raise ValueError("--device cuda but no GPU is visible")
        n = num_workers or available_gpus
        if n > available_gpus:
            raise ValueError(f"--num-workers {n} > {available_gpus} visible GPUs")
        return Placement("cuda", n, max(1, available_cpus // n))
    n = num_workers or 1
    return Placement("cpu", n, max(1, available_cpus // n))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, port: int, device: str) -> None:
    """Join the adapter all-reduce group (no-op for a single worker)."""
    if world_size == 1:
        return
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=(rank == 0),
                          timeout=timedelta(minutes=5))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=30))


def set_cpu_threads(n: int) -> None:
    """Ray pins OMP_NUM_THREADS=1 in actors; give each CPU worker its share of the cores."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def start_ray(address: str, num_cpus: int | None = None) -> bool:
    """ray.init unless Ray is already up; returns True when this call started it (so we own
    its shutdown). Only the instance started here is ever shut down, via ray.shutdown()."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def create_placement_group(placement: Placement):  # -> ray.util.placement_group.PlacementGroup
    """Reserve one bundle per worker (1 GPU + its CPUs, or CPUs only) and wait until ready."""
    import ray
    from ray.util.placement_group import placement_group

    bundle = {"CPU": placement.cpus_per_worker}
    if placement.device == "cuda":
        bundle["GPU"] = 1
    pg = placement_group([dict(bundle) for _ in range(placement.num_workers)], strategy="PACK")
    ray.get(pg.ready(), timeout=600)
    return pg
