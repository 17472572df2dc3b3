"""Native rollout engine: torch-free scheduler, batched sampling, continuous-batching engine.

Import the submodules directly (`orbit.rollout.engine`, `orbit.rollout.types`, ...); this
file imports nothing so the torch-free parts stay importable without torch.
"""
