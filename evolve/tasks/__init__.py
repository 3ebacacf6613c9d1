"""Evaluation tasks: synthetic long-context retrieval (no downloads) and LongBench JSONL files."""
