"""Per-layer pages (issue 29, ``--kv-eviction-granularity layer``) through vLLM's engine.

Every attention layer becomes a KV-cache group of its own, so each layer frees its own pages. One
batch of requests (a 4-layer tiny random Llama, in-process ``vllm.LLM``: :func:`servers.llm_results`)
runs on three engines: shared pages, per-layer pages, per-layer pages under a pyramid budget.

* Streaming decides by position only, so every layer frees exactly the pages shared pages free:
  the same greedy tokens (the attention kernels see the same cache through other block tables),
  the same pages once per layer, four times the blocks held.
* SnapKV decides per layer from each layer's own attention: the layers free different pages, each
  within its own budget; NAMM frees pages per layer too. (Not H2O: on this random model its
  accumulated attention favours the same positions in every layer, so all four free the same pages.)
* A pyramid budget (PyramidKV) keeps more pages in the first layer than in the last.
* Step snapshots (eviction-aware prefix caching) need a single KV-cache group: with per-layer pages
  a repeated request resumes from nothing (it prefills again) and gives its first answer, where on
  shared pages the same repeat resumes from a snapshot.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from servers import BLOCK_SIZE, ServerPool, llm_results

pytestmark = [pytest.mark.server, pytest.mark.timeout(1800)]

LAYERS = 4
ENGINE = {"policy": "streaming", "budget": {"tokens": 512}, "protect": {"sink_tokens": 32}}
RATIO = 0.25
REQUESTS = [
    (2500, 1, 24, None),  # the engine's streaming, budget 512
    (2000, 2, 24, {"kv_eviction": "snapkv", "kv_eviction_ratio": RATIO}),
    (2200, 3, 24, {"kv_eviction": "namm"}),  # shipped weights
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, server_pool: ServerPool) -> Path:
    from benchmarks.tiny_model import build_random_llama

    server_pool.close()  # in-process engines here: one engine at a time
    return build_random_llama(tmp_path_factory.mktemp("llama4") / "m", seed=0, layers=LAYERS)


def run(model: Path, **engine: Any) -> list[dict[str, Any]]:
    return llm_results(model, REQUESTS, max_model_len=4096, additional_config={"namm": ENGINE | engine})


@pytest.fixture(scope="module")
def shared(model: Path) -> list[dict[str, Any]]:
    return run(model)


@pytest.fixture(scope="module")
def per_layer(model: Path) -> list[dict[str, Any]]:
    return run(model, granularity="layer")


def test_streaming_frees_the_shared_pages_in_every_layer(shared, per_layer):
    s, p = shared[0], per_layer[0]
    assert p["ids"] == s["ids"]
    assert max(abs(a - b) for a, b in zip(p["logprobs"], s["logprobs"], strict=True)) < 1e-5
    ss, ps = s["summary"], p["summary"]
    assert ss["evicted_pages"], "nothing freed: the comparison would be empty"
    assert Counter(ps["evicted_pages"]) == Counter({page: LAYERS for page in ss["evicted_pages"]})
    assert ps["held_blocks_by_group"] == [ss["held_blocks"]] * LAYERS
    assert ps["logical_blocks"] == LAYERS * ss["logical_blocks"]
    assert ps["retained_fraction"] == pytest.approx(ss["retained_fraction"])
    assert ps["eviction_steps"] == ss["eviction_steps"]


def test_snapkv_and_namm_free_pages_per_layer(per_layer):
    snapkv, namm = per_layer[1]["summary"], per_layer[2]["summary"]
    counts = Counter(snapkv["evicted_pages"])
    assert any(n % LAYERS for n in counts.values()), "every layer freed the same pages"
    context = 2000 + 24 - 1
    budget_pages = -(-round(RATIO * context) // BLOCK_SIZE)
    for held in snapkv[
        "held_blocks_by_group"
    ]:  # the budget, plus at most the page being written and the tail
        assert budget_pages <= held <= budget_pages + 2, snapkv
    assert namm["evicted_blocks"] > 0 and len(namm["held_blocks_by_group"]) == LAYERS, namm


def test_pyramid_budget_keeps_more_in_the_first_layer(model: Path, per_layer):
    pyramid = run(model, granularity="layer", layer_budget="pyramid")[1]["summary"]
    held, uniform = pyramid["held_blocks_by_group"], per_layer[1]["summary"]["held_blocks_by_group"]
    assert held[0] > uniform[0] and held[-1] < uniform[-1], (held, uniform)
    assert held == sorted(held, reverse=True), held
    # PyramidKV's shares add up to the layers: the total stays the uniform one, up to rounding in pages
    assert abs(sum(held) - sum(uniform)) <= LAYERS + 2, (held, uniform)


@pytest.mark.parametrize("granularity", ["shared", "layer"])
def test_snapshots_need_one_kv_cache_group(model: Path, granularity: str):
    lone = [REQUESTS[0]]  # alone, so its history is canonical and its steps leave snapshots
    first, again = llm_results(
        model,
        lone,
        repeat=2,
        max_model_len=4096,
        enable_prefix_caching=True,
        additional_config={"namm": ENGINE | {"granularity": granularity}},
    )
    assert again["ids"] == first["ids"]
    assert max(abs(a - b) for a, b in zip(again["logprobs"], first["logprobs"], strict=True)) < 1e-5
    assert first["summary"]["prefix_restored_tokens"] == 0
    restored = again["summary"]["prefix_restored_tokens"]
    if granularity == "layer":  # several groups: no snapshot recorded or resumed
        assert restored == 0 and "prefix_records" not in again["summary"], again["summary"]
    else:  # the control: the same repeat on shared pages does resume
        assert restored >= 512, again["summary"]
