"""The shipped, self-trained long-context model loads in vLLM and retrieves a held-out passkey.

Self-contained for now (in-process ``vllm.LLM`` on CPU); skipped only when the model
folder is absent (it is built by ``python -m benchmarks.train_model``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "namm-tiny-llama"
EVAL_SEED_BASE = 10**9  # held-out seeds, as in benchmarks/train_model.py (training uses [0, 10**7))


@pytest.fixture(scope="module")
def llm():
    if not (MODEL_DIR / "config.json").exists() or not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"trained model not found at {MODEL_DIR}; build it with `python -m benchmarks.train_model`")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    engine = LLM(str(MODEL_DIR), enforce_eager=True, dtype="float32", max_model_len=8192, seed=0)
    yield engine
    del engine


@pytest.mark.server
def test_trained_model_answers_held_out_passkey(llm):
    from vllm import SamplingParams

    from evolve.tasks.synthetic import make_sample, score_answer

    sample = make_sample("passkey", EVAL_SEED_BASE, 4096)
    assert sample.prompt.endswith("The pass key is")
    out = llm.generate([sample.prompt], SamplingParams(temperature=0.0, max_tokens=8))
    completion = out[0].outputs[0].text
    assert len(out[0].prompt_token_ids) == len(sample.prompt)  # one token per character, no BOS
    assert score_answer(completion, sample.answer) == 1.0, (
        f"expected pass key {sample.answer}, got {completion!r}")
