"""An evicting request's answer does not depend on whether its prefix was cached (issue 27).

A prefix-cache hit skips the prefill of the cached tokens, so their queries never reach the
policy (attention columns, NAMM's EMA, H2O's sums, SnapKV's window): the pages kept, and the
answer, would depend on what happened to be cached. Each policy's request is sent three times
on one server with prefix caching on (vLLM's default): with a ``cache_salt`` of its own (nothing
can be cached for it: the fresh answer), then twice plainly (by then the prompt is cached by the
earlier requests), and all three must agree; likewise a prompt that shares only the first half.
A ``none`` request afterwards still reads the cache and gets the full-cache answer.

The model is our trained tiny Llama (``benchmarks/models/namm-tiny-llama``), so the NAMM answer
can be checked for correctness (at block size 32, the issue's setting; with 64-token pages the
default weights get this prompt wrong, consistently); every comparison runs at both block sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from servers import BASE_FLAGS, ServerPool, VllmServer, metric_sum

from evolve.tasks.synthetic import make_sample, score_answer

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]

MODEL_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "namm-tiny-llama"
SAMPLE = make_sample("passkey", 10**9 + 7, 3000)  # held-out seed; the default NAMM answers it
HALF = make_sample("passkey", 10**9 + 8, 3000)
SHARES_FIRST_HALF = SAMPLE.prompt[: len(SAMPLE.prompt) // 2] + HALF.prompt[len(HALF.prompt) // 2 :]
_at = BASE_FLAGS.index("--block-size")
BASE_FLAGS_ANY_BLOCK = BASE_FLAGS[:_at] + BASE_FLAGS[_at + 2 :]
POLICIES: dict[str, dict[str, Any]] = {
    "namm": {},  # the server's: the default weights
    "snapkv": {"kv_eviction": "snapkv", "kv_eviction_budget": 512},
    "h2o": {"kv_eviction": "h2o", "kv_eviction_budget": 512},
    "l2": {"kv_eviction": "l2", "kv_eviction_budget": 512},
    "streaming": {"kv_eviction": "streaming", "kv_eviction_budget": 512},
}


def greedy(server: VllmServer, prompt: str, xargs: dict[str, Any], salt: str | None = None) -> dict[str, Any]:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": 1,
        "vllm_xargs": xargs or None,
    } | ({"cache_salt": salt} if salt else {})
    r = requests.post(server.base_url + "/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text[:2000]
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]["token_logprobs"]}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["text"] == b["text"]
        and max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < 1e-4
    )


@pytest.fixture(scope="module", params=[32, 64], ids=["block32", "block64"])
def block_size(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture(scope="module")
def server(block_size: int, server_pool: ServerPool) -> VllmServer:
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip(f"trained model not found at {MODEL_DIR}")
    flags = ["--kv-eviction", "namm", "--block-size", str(block_size)]  # prefix caching: on (vLLM's default)
    return server_pool.get(
        f"prefix-cache-namm-{block_size}", MODEL_DIR, flags, base_flags=BASE_FLAGS_ANY_BLOCK
    )


@pytest.mark.parametrize("policy", list(POLICIES))
def test_answer_does_not_depend_on_the_prefix_cache(server: VllmServer, block_size: int, policy: str):
    xargs = POLICIES[policy]
    for prompt, tag in ((SAMPLE.prompt, "whole"), (SHARES_FIRST_HALF, "half")):
        # A `none` request first: it reads and fills the prefix cache, so the prompt is cached
        # (whole, or its first half) whatever ran before.
        greedy(server, prompt, {"kv_eviction": "none"})
        fresh = greedy(server, prompt, xargs, salt=f"fresh-{policy}-{tag}-{server.port}")
        again = [greedy(server, prompt, xargs) for _ in range(2)]
        for got in again:
            assert same(got, fresh), f"{policy} {tag}: cached {got} vs fresh {fresh}"
        if policy == "namm" and tag == "whole" and block_size == 32:  # 64-token pages lose it
            assert score_answer(fresh["text"], SAMPLE.answer) == 1.0, (fresh, SAMPLE.answer)


def test_a_request_that_does_not_evict_still_reads_the_cache(server: VllmServer):
    before = metric_sum(server.metrics(), "vllm:prefix_cache_hits_total")
    full = greedy(server, SAMPLE.prompt, {"kv_eviction": "none"})
    hits = metric_sum(server.metrics(), "vllm:prefix_cache_hits_total") - before
    assert hits >= len(SAMPLE.prompt) // 2, hits  # the whole-prompt blocks written by `none` requests
    fresh = greedy(server, SAMPLE.prompt, {"kv_eviction": "none"}, salt=f"fresh-none-{server.port}")
    assert same(full, fresh), (full, fresh)
