"""Rewards: rule-based verifiers (math \\boxed{}, arithmetic, countdown, format), custom reward
functions loaded by path, and a runner that computes them in parallel without ever crashing
a training step."""
