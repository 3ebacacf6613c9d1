"""The real model end to end: SmolLM2-135M-Instruct (fetched by the install script) served with
``--kv-eviction namm`` (which loads the weights shipped for it, ``l2-smollm2``) answers a short
real-text question right while holding fewer KV blocks than the full cache (issue 26's CI check)."""

from __future__ import annotations

import os

import pytest
from servers import ServerPool, complete, engine_errors, namm_summary

from evolve.assets import SMOLLM2_DIR, AssetError, check_model_dir

pytestmark = pytest.mark.server

PROMPT_TOKENS = 1800
"""Three eviction steps (every 512 tokens) before the question is read, short enough for CI."""


@pytest.fixture(scope="module")
def smollm2() -> str:
    try:
        return str(check_model_dir(SMOLLM2_DIR))
    except AssetError as e:
        if os.environ.get("NAMM_FETCH_ASSETS") == "0":
            pytest.skip(f"NAMM_FETCH_ASSETS=0: {e}")
        raise


def test_namm_on_smollm2_answers_a_real_text_question_with_fewer_blocks(
    smollm2: str, server_pool: ServerPool
) -> None:
    from evolve.tasks import realtext

    sample = realtext.make_sample(
        "niah_number", 10**9 + 11, PROMPT_TOKENS, realtext.load_tokenizer(smollm2), depth=0.3
    )
    server = server_pool.get(
        "smollm2-namm",
        smollm2,
        ["--kv-eviction", "namm", "--max-model-len", "2048"],
        env={"VLLM_CPU_KVCACHE_SPACE": "2"},
    )
    namm = complete(server, sample.prompt, max_tokens=sample.max_tokens)
    full = complete(server, sample.prompt, max_tokens=sample.max_tokens, vllm_xargs={"kv_eviction": "none"})
    stats = namm_summary(namm)
    answers = [r["choices"][0]["text"] for r in (namm, full)]
    assert [realtext.score_answer(a, sample) for a in answers] == [1.0, 1.0], (sample.answer, answers)
    block = 32
    full_blocks = -(-(full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"] - 1) // block)
    assert stats["evicted_blocks"] > 0 and stats["held_blocks"] < full_blocks, (stats, full_blocks)
    assert "NAMM weights l2-smollm2" in server.log_text()  # chosen for this model, and said so
    assert not engine_errors(server)


@pytest.mark.timeout(1200)
def test_serving_benchmark_scores_real_text_answers_beside_the_serving_figures(
    smollm2: str, server_pool: ServerPool, tmp_path
) -> None:
    """``benchmarks serving --tasks realtext``: every request's answer is scored in the same run as
    the serving figures (issue 28), and the full cache answers these two needles right."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    server_pool.close()  # the benchmark starts its own servers; one SmolLM2 at a time
    out = tmp_path / "out"
    modes = ["none", "streaming:ratio=0.25"]
    args = "serving --tasks realtext --task-kinds niah_number --num-requests 2 --prompt-tokens 1024 --max-tokens 16"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            *args.split(),
            "--model",
            smollm2,
            "--modes",
            *modes,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=1100,  # two server start-ups and 2 x 2 requests; bounds a hang only
    )
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "serving.json").read_text())
    by_mode = {m["mode"]: m for m in report["results"]}
    assert list(by_mode) == modes
    for m in by_mode.values():
        assert all(q["answer_text"] and q["correct"] is not None for q in m["requests"]), m["requests"]
        assert m["summary"]["accuracy"] is not None and m["summary"]["kv_mib_per_request"] > 0
    assert by_mode["none"]["summary"]["accuracy"] == 1.0, [
        q["answer_text"] for q in by_mode["none"]["requests"]
    ]
    assert "| accuracy" in report["table"] and "modelled (not measured)" in report["table"]
