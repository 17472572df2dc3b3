"""Orbit: RL post-training on a frozen low-precision base with BF16 adapters."""

__version__ = "0.1.0"
