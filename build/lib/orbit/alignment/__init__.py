"""Precision alignment: train-vs-rollout log-prob parity, exact (batch-invariant) mode, and the
checks built on it.

- `exact`: `convert_exact(model)` switches a CausalLM to batch-invariant kernels (module swaps);
- `measure`: sample with the engine, re-score on the trainer path, compare per token;
- `variants`: the (precision, adapter, mode) models and the conventional BF16-trainer baseline;
- `monitor`: `MismatchMonitor`, a per-step jump detector for the trainer's mismatch metrics.
Import the submodules directly; this package imports nothing at import time.
"""
