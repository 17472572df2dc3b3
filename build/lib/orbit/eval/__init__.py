"""Evaluation metrics over sampled responses (pass@k)."""
