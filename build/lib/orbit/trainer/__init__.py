"""PolicyWorker (model + adapter + optimizer + engine), checkpointing, metrics, LR schedule."""
