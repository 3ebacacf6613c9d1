"""An evicting request's answer does not depend on whether its prefix was cached (issue 27).

A prefix-cache hit skips the prefill of the cached tokens, so their queries never reach the
policy (attention columns, NAMM's EMA, H2O's sums, SnapKV's window): the pages kept, and the
answer, would depend on what happened to be cached. An evicting request therefore reads no
ordinary hit; it resumes from a step snapshot of its own settings instead (eviction-aware prefix
caching). Each policy's request is sent three times on one server with prefix caching on (vLLM's
default): with a ``cache_salt`` of its own (nothing can be cached for it: the fresh answer), then
twice plainly: the first prefills and records snapshots, the second resumes from the longest one;
all three must agree (tokens, and logprobs within 1e-4). Likewise a prompt that shares only the
first half, which resumes from the whole prompt's snapshots. A ``none`` request afterwards still
reads the ordinary cache and gets the full-cache answer; a request with other settings on the
same prefix never sees the snapshots.

The model is our trained tiny Llama (``benchmarks/models/namm-tiny-llama``), so the NAMM answer
can be checked for correctness (at block size 32, the issue's setting; with 64-token pages the
default weights get this prompt wrong, consistently); every comparison runs at both block sizes,
the 32-token server at the default lag (2: the step at a snapshot's boundary is still pending
there, its pages freed after the next chunk) and the 64-token one at lag 0 (freed at once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from servers import (
    BASE_FLAGS,
    HOLD_FLAGS,
    Hold,
    ServerPool,
    VllmServer,
    engine_errors,
    metric_sum,
    settled_usage,
    wait_idle,
)

from evolve.tasks.synthetic import kv_question, make_sample, score_answer, shared_document

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


def greedy(
    server: VllmServer, prompt: str, xargs: dict[str, Any] | None, salt: str | None = None
) -> dict[str, Any]:
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
    body = r.json()
    choice = body["choices"][0]
    summary = (body.get("kv_transfer_params") or {}).get("namm") or {}
    return {
        "text": choice["text"],
        "logprobs": choice["logprobs"]["token_logprobs"],
        "restored": summary.get("prefix_restored_tokens", 0),
        "prompt_tokens": body["usage"]["prompt_tokens"],
    }


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
    flags = ["--kv-eviction", "namm", "--block-size", str(block_size), *HOLD_FLAGS]  # prefix caching: on
    if block_size == 64:
        flags += ["--kv-eviction-lag", "0"]
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
        assert fresh["restored"] == 0, "a salted prompt has nothing to resume from"
        assert again[1]["restored"] >= 512, f"{policy} {tag}: the repeat resumed from no snapshot"
        if policy == "namm" and tag == "whole" and block_size == 32:  # 64-token pages lose it
            assert score_answer(fresh["text"], SAMPLE.answer) == 1.0, (fresh, SAMPLE.answer)


def test_a_request_that_does_not_evict_still_reads_the_cache(server: VllmServer):
    before = metric_sum(server.metrics(), "vllm:prefix_cache_hits_total")
    full = greedy(server, SAMPLE.prompt, {"kv_eviction": "none"})
    hits = metric_sum(server.metrics(), "vllm:prefix_cache_hits_total") - before
    assert hits >= len(SAMPLE.prompt) // 2, hits  # the whole-prompt blocks written by `none` requests
    fresh = greedy(server, SAMPLE.prompt, {"kv_eviction": "none"}, salt=f"fresh-none-{server.port}")
    assert same(full, fresh), (full, fresh)


def test_other_settings_never_see_the_snapshots(server: VllmServer):
    """Snapshots are keyed by the settings' fingerprint: a request on the same prefix with another EMA
    coefficient, threshold or budget resumes from none of them and gets its own fresh answer; with
    the recording settings again, it resumes."""
    # A prompt of its own from the first page on: the other tests' snapshots (snapkv's at budget
    # 512 among them) cover SAMPLE.prompt, so any prompt extending it would resume from them.
    prompt = "Once more. " + SAMPLE.prompt
    recorder = {"kv_eviction": "h2o", "kv_eviction_budget": 512}
    greedy(server, prompt, recorder)
    others = [
        {"kv_eviction": "h2o", "kv_eviction_budget": 384},
        {"kv_eviction": "snapkv", "kv_eviction_budget": 512},
        {"namm_ema_coeff_per_step": 0.999},
        {"namm_threshold": 0.25},
    ]
    for i, xargs in enumerate(others):
        got = greedy(server, prompt, xargs)
        fresh = greedy(server, prompt, xargs, salt=f"other-{i}-{server.port}")
        assert got["restored"] == 0, f"{xargs} resumed from another setting's snapshot"
        assert same(got, fresh), (xargs, got, fresh)
    assert greedy(server, prompt, recorder)["restored"] >= 512


def test_a_shared_document_is_prefilled_once(server: VllmServer):
    """Eight questions over one 2000-token document: the first request prefills it and records
    snapshots, the seven others resume from the longest one (vLLM counts the resumed tokens as cached
    prompt tokens, like any prefix-cache hit) and each answers exactly as it does fresh."""
    document, facts = shared_document(seed=11, target_tokens=2000, n_facts=8)
    prompts = [document + "\n" + kv_question(key) for key, _ in facts]
    before = server.metrics()
    got = [greedy(server, p, None) for p in prompts]
    after = server.metrics()
    fresh = [greedy(server, p, None, salt=f"doc-{i}-{server.port}") for i, p in enumerate(prompts)]
    for g, f in zip(got, fresh, strict=True):
        assert same(g, f), (g, f)
    restored = [g["restored"] for g in got]
    boundary = 1536  # the last step boundary below 2000 with nothing pending: 1536 at lag 0 and 2
    assert restored == [0] + [boundary] * 7, restored

    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    prompt_tokens = delta("vllm:prompt_tokens_total")
    assert prompt_tokens == sum(g["prompt_tokens"] for g in got)
    assert delta("vllm:prompt_tokens_cached_total") == sum(restored)
    assert delta("vllm_namm:prefix_snapshot_tokens_saved_total") == sum(restored)
    assert delta("vllm_namm:prefix_snapshot_hits_total") == 7
    assert metric_sum(after, "vllm_namm:prefix_snapshot_bytes") > 0


def test_an_aborted_restored_request_gives_everything_back(server: VllmServer):
    """A client leaves a request that resumed from a snapshot, in the middle of its decode (held at
    its third token, so the moment cannot be missed): every KV block comes back, the engine logs no
    error, and the snapshot still serves the next request, which answers as it does fresh."""
    prompt = "Left behind. " + SAMPLE.prompt  # a prompt of its own from the first page on
    greedy(server, prompt, None)  # records the snapshots
    usage = settled_usage(server)
    cached = metric_sum(server.metrics(), "vllm:prompt_tokens_cached_total")
    hold = Hold(3)
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": 256,
        "temperature": 0.0,
        "stream": True,
        "vllm_xargs": hold.xargs,
    }
    r = requests.post(server.base_url + "/completions", json=body, stream=True, timeout=600)
    try:
        assert r.status_code == 200, r.text[:2000]
        hold.wait_held()
        line = next(x for x in r.iter_lines() if x.startswith(b"data: "))
        assert json.loads(line[len(b"data: ") :])["choices"][0]["finish_reason"] is None
    finally:
        r.close()
        hold.release()
    wait_idle(server)
    assert metric_sum(server.metrics(), "vllm:prompt_tokens_cached_total") - cached >= 512, "no resume"
    assert settled_usage(server) == usage
    again = greedy(server, prompt, None)
    assert again["restored"] >= 512
    assert same(again, greedy(server, prompt, None, salt=f"left-{server.port}"))
    assert not engine_errors(server), engine_errors(server)[:5]
