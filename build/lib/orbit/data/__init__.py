"""Data side of RL: the Sample record, JSONL prompt loading, and built-in task generators."""
