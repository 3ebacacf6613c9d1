"""Evaluation tasks: LongBench JSONL files (the synthetic retrieval tasks live in :mod:`vllm_namm.synthetic`)."""
