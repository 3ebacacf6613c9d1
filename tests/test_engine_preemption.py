"""Eviction under memory pressure and with prefix caching, through real ``vllm serve`` processes.

* Preemption: more running requests than the KV pool can hold forces vLLM to preempt
  (recompute) some; after resumption eviction starts over and every request completes.
* Prefix caching: blocks computed after an eviction saw a pruned context and must never be
  reused by a request that expects the full one.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import openai
import pytest
from servers import ServerPool

from benchmarks.launch import CPU_DEFAULTS, VllmServer
from vllm_namm.config import EvictionConfig

pytestmark = pytest.mark.server

BASE = [*CPU_DEFAULTS, "--block-size", "32"]


@pytest.fixture(scope="module")
def model(tiny_model: Path, server_pool: ServerPool) -> str:
    server_pool.close()  # this module starts servers of its own: one live server at a time
    return str(tiny_model)


def _complete(
    server: VllmServer, model: str, prompt: str, max_tokens: int, **extra
) -> openai.types.Completion:
    return server.client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
    )


def test_preempted_requests_resume_evicting_and_all_complete(model: str) -> None:
    # 65 usable blocks of 32 tokens; 8 requests of ~1.3k prompt + 700 generated tokens need
    # ~60 blocks each in full and ~16 with a 256-token budget: 8 x 16 > 65, so vLLM preempts.
    args = [
        *BASE,
        "--max-model-len",
        "2048",
        "--num-gpu-blocks-override",
        "66",
        "--max-num-seqs",
        "8",
        "--kv-eviction",
        "streaming",
        "--kv-eviction-budget",
        "256",
    ]
    with VllmServer(model, args) as srv:
        start_usage = srv.metric("vllm:kv_cache_usage_perc")
        preempt0 = srv.metric("vllm:num_preemptions_total") or 0.0

        # 1200 tokens: one step snapshot, at 512 (at lag 2 a step begins at 512, 1536, 2560, ...)
        shared = "The grass is green. " * 60

        def go(i: int):
            return _complete(srv, model, shared + f"Request {i}.", 700, ignore_eos=True)

        # A lone request first records the shared prefix's step snapshots (eviction-aware prefix
        # caching): the 8 requests resume from them, so preemption also meets restored requests.
        _complete(srv, model, shared, 8)
        # No timing: the 8 requests are sent at once and each needs 700 decode steps, so they
        # decode side by side, and 8 x 16 blocks do not fit in 65: vLLM must preempt. The
        # counters and the gauge are read after every request ended (recorded before its answer).
        with cf.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(go, range(8)))
        preemptions = (srv.metric("vllm:num_preemptions_total") or 0.0) - preempt0
        assert preemptions >= 1, "the workload was meant to force preemption"
        for r in results:
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 700
            stats = r.model_extra["kv_transfer_params"]["namm"]
            # Budget 8 pages + first page + page being written + partly scored tail: eviction
            # resumed after preemption (a request without eviction would hold ~62 blocks).
            assert stats["held_blocks"] <= 256 // 32 + 4 + 512 // 32, stats
        # The first request admitted finds the snapshot's pages as the lone request left them.
        assert (
            max(r.model_extra["kv_transfer_params"]["namm"]["prefix_restored_tokens"] for r in results) >= 512
        )
        assert srv.metric("vllm:kv_cache_usage_perc") == start_usage
        assert srv.healthy()


def test_blocks_computed_after_eviction_are_not_prefix_cache_hits(model: str) -> None:
    prompt = "The river is calm today. A bird looks slow here. " * 50  # ~2.5k tokens
    with VllmServer(model, [*BASE, "--max-model-len", "4096"], env={"VLLM_PLUGINS": ""}) as vanilla:
        expected = _complete(vanilla, model, prompt, 24).choices[0].text
    args = [*BASE, "--max-model-len", "4096", "--kv-eviction", "streaming", "--kv-eviction-budget", "256"]
    with VllmServer(model, args) as srv:
        evicted = _complete(srv, model, prompt, 24)
        assert evicted.model_extra["kv_transfer_params"]["namm"]["evicted_blocks"] > 0
        # Same prompt, full cache: only blocks from before the first eviction may be reused.
        full = _complete(srv, model, prompt, 24, vllm_xargs={"kv_eviction": "none"})
        assert full.choices[0].text == expected
        hits = srv.metric("vllm:prefix_cache_hits_total")
        assert hits is not None and hits > 0, "the full-context prefix blocks are still reusable"
        # The first step starts at 512 tokens and frees pages `lag` engine steps (512-token chunks)
        # later; blocks computed before that saw the full context: exact, so they may be reused.
        lag = EvictionConfig().lag
        assert hits <= 512 * (1 + lag), "blocks computed after pages were first freed must not be hits"
        # NAMM on a request whose first 512 tokens come from the prefix cache: its state must
        # start with those tokens (a bug once killed the engine here).
        namm = _complete(
            srv, model, prompt[:1200] + "A new tail. " * 40, 8, vllm_xargs={"kv_eviction": "namm"}
        )
        assert namm.choices[0].finish_reason in ("length", "stop")
        assert srv.healthy()
