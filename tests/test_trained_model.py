"""The shipped, self-trained long-context model loads in ``vllm serve`` and retrieves a held-out passkey.

Skipped only when the model folder is absent (it is built by ``python -m benchmarks.train_model``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import ServerPool

MODEL_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "namm-tiny-llama"
EVAL_SEED_BASE = 10**9  # held-out seeds, as in benchmarks/train_model.py (training uses [0, 10**7))


@pytest.mark.server
def test_trained_model_answers_held_out_passkey(server_pool: ServerPool):
    from evolve.tasks.synthetic import make_sample, score_answer

    if not (MODEL_DIR / "config.json").exists() or not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(
            f"trained model not found at {MODEL_DIR}; build it with `python -m benchmarks.train_model`"
        )
    server = server_pool.get("trained-none", MODEL_DIR, ["--kv-eviction", "none"])
    sample = make_sample("passkey", EVAL_SEED_BASE, 4096)
    assert sample.prompt.endswith("The pass key is")
    out = server.client.completions.create(
        model=server.model_name(), prompt=sample.prompt, max_tokens=8, temperature=0.0
    )
    assert out.usage.prompt_tokens == len(sample.prompt)  # one token per character, no BOS
    completion = out.choices[0].text
    assert score_answer(completion, sample.answer) == 1.0, (
        f"expected pass key {sample.answer}, got {completion!r}"
    )
