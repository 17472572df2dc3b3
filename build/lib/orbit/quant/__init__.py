"""Frozen base weights: formats, quantization, checkpoint and GGUF import, QuantLinear."""
