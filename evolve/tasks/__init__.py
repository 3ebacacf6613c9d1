"""Evaluation tasks: LongBench JSONL files (:mod:`.longbench`) and the real-text tasks over the
Paul Graham essays (:mod:`.realtext`); the synthetic retrieval tasks of our tiny model live in
:mod:`evolve.tasks.synthetic`."""
