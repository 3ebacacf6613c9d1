"""Eviction on vLLM's own multi-worker executor (issue 13), against real ``vllm serve`` processes.

Servers of the tiny random Llama (2 layers, 2 KV heads), one live at a time, with the same
eviction flags:

* TP=1, eager: the reference;
* TP=2, compiled (no ``--enforce-eager``: torch.compile on CPU): each rank holds one KV head;
* PP=2, compiled (vLLM 0.32's CPU build runs pipeline parallelism only compiled): each stage
  holds one layer;

and, last, TP=2 with ``--kv-eviction none`` (vLLM's own engine), token-identical to TP=1.

Every server serves the same 3000-token greedy request under several policies, chosen per
request (``vllm_xargs``) on one server: ``none``, streaming (the server's: budget 512), NAMM
with a random candidate vector (``namm_params``) and h2o with page selection. The multi-worker
servers must free exactly the pages the TP=1 server frees (the ``evicted_pages`` of the
per-request summary), with the same statistics, and return the same greedy tokens (float32).
The TP=2 server also runs the abort/prefix-cache workload
(:func:`servers.concurrent_mixed_requests_with_aborts`) and shows the saving on vLLM's own KV
gauge while a request decodes (held there: :class:`servers.Hold`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from servers import (
    BASE_FLAGS,
    BLOCK_SIZE,
    HOLD_FLAGS,
    STREAMING_FLAGS,
    ServerPool,
    VllmServer,
    complete,
    concurrent_mixed_requests_with_aborts,
    engine_errors,
    namm_summary,
    run_vllm_fail,
    text,
    usage_while_decoding,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(1800)]

# majority: NAMM's random scores free pages; lag 1: pipeline parallelism needs a lag >= 1, and the TP=1
# reference must run the same lag to free the same pages at the same steps
FLAGS = [
    *STREAMING_FLAGS[: STREAMING_FLAGS.index("--kv-eviction-lag")],
    "--kv-eviction-page-rule",
    "majority",
]
FLAGS += ["--kv-eviction-lag", "1", *STREAMING_FLAGS[STREAMING_FLAGS.index("--kv-eviction-lag") + 2 :]]
FLAGS += HOLD_FLAGS  # holds a request mid-decode for the KV usage and abort checks (logits unchanged)
COMPILED_FLAGS = tuple(f for f in BASE_FLAGS if f != "--enforce-eager")
PROMPT = text(3000, 5)
NEW_TOKENS = 16


def namm_candidate() -> list[float]:
    from vllm_namm.policies import DEFAULT_WEIGHTS
    from vllm_namm.weights import load_weights

    n = load_weights(DEFAULT_WEIGHTS).params.numel()
    return (0.3 * torch.randn(n, generator=torch.Generator().manual_seed(0))).tolist()


POLICIES: dict[str, dict[str, Any]] = {
    "none": {"kv_eviction": "none"},
    "streaming": {},  # the server's own: budget 512, 32 sink tokens
    "namm": {"kv_eviction": "namm", "namm_params": namm_candidate()},
    "h2o": {"kv_eviction": "h2o", "kv_eviction_budget": 512},  # page-level selection: the max/sum votes
}


def serve_all(server: VllmServer) -> dict[str, dict[str, Any]]:
    """The 3000-token request under every policy, plus two short ones without eviction."""
    out: dict[str, dict[str, Any]] = {}
    for name, xargs in POLICIES.items():
        r = complete(server, PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1, vllm_xargs=xargs)
        choice = r["choices"][0]
        out[name] = {
            "ids": choice["token_ids"],
            "logprobs": choice["logprobs"]["token_logprobs"],
            "summary": None if name == "none" else namm_summary(r),
        }
    for i, n in enumerate((5, 700)):  # without eviction (700 tokens exceed the streaming budget)
        r = complete(server, text(n, 10 + i), max_tokens=32, logprobs=1, vllm_xargs={"kv_eviction": "none"})
        out[f"short-{n}"] = {
            "ids": r["choices"][0]["token_ids"],
            "logprobs": r["choices"][0]["logprobs"]["token_logprobs"],
            "summary": None,
        }
    return out


HELD_AT = 16
"""Decode token at which KV usage is read (the request held there: :class:`servers.Hold`)."""


@pytest.fixture(scope="module")
def reference(server_pool: ServerPool, tiny_model: Path) -> dict[str, dict[str, Any]]:
    server = server_pool.get("tp1", tiny_model, FLAGS)
    results = serve_all(server)
    assert not engine_errors(server), engine_errors(server)[:20]
    return results


def check_same_as_reference(results: dict[str, dict[str, Any]], reference: dict[str, dict[str, Any]]) -> None:
    for name, want in reference.items():
        got = results[name]
        assert got["ids"] == want["ids"], f"{name}: greedy tokens differ\n{got['ids']}\n{want['ids']}"
        diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True))
        assert diff < 1e-3, (name, diff)
        if want["summary"] is None:
            continue
        s, w = got["summary"], want["summary"]
        assert s["evicted_pages"], f"{name}: the check is empty: nothing was freed ({w})"
        assert s["evicted_pages"] == w["evicted_pages"], name
        for key in ("held_blocks", "token_evictions_requested", "token_evictions_realised", "eviction_steps"):
            assert s[key] == w[key], (name, key, s[key], w[key])


def check_saving(server: VllmServer) -> None:
    """``vllm:kv_cache_usage_perc`` while decoding: streaming holds its budget, none everything.

    Each 3000-token request is held at its 16th decode token, so the gauge is read while it
    runs, at that position, however busy the machine is.
    """

    def blocks(policy: str, seed: int) -> float:
        xargs = POLICIES[policy]
        return usage_while_decoding(server, text(3000, seed), 4000, HELD_AT, vllm_xargs=xargs).blocks

    full, kept = blocks("none", 6), blocks("streaming", 7)
    assert full >= -(-3000 // BLOCK_SIZE) - 0.5, full
    # budget pages + the sink page + the page being written + the pages decoded since the last step
    assert kept <= 512 / BLOCK_SIZE + 2 + -(-HELD_AT // BLOCK_SIZE), kept
    assert kept < 0.3 * full, (kept, full)


# ---------------------------------------------------------------------------------------------
# tensor parallel 2, compiled
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp2_server(server_pool: ServerPool, tiny_model: Path, reference) -> VllmServer:
    return server_pool.get(
        "tp2", tiny_model, [*FLAGS, "--tensor-parallel-size", "2"], base_flags=COMPILED_FLAGS
    )


def test_tp2_starts_compiled_with_votes_over_two_ranks(tp2_server: VllmServer):
    log = tp2_server.log_text()
    assert "enforce_eager=False" in log and "'mode': <CompilationMode.NONE" not in log  # torch.compile ran
    assert "2 workers (tensor parallel 2, pipeline 1)" in log
    assert log.count("page plans agreed over a gloo group, reports freed blocks") == 1  # one reporting rank


def test_tp2_frees_the_same_pages_and_tokens_as_tp1(tp2_server: VllmServer, reference):
    check_same_as_reference(serve_all(tp2_server), reference)


def test_tp2_kv_usage_shows_the_saving(tp2_server: VllmServer):
    check_saving(tp2_server)


def test_tp2_concurrent_requests_with_aborts_return_every_block(tp2_server: VllmServer):
    concurrent_mixed_requests_with_aborts(tp2_server)


# ---------------------------------------------------------------------------------------------
# pipeline parallel 2: refused (its page-plan collective deadlocked against vLLM's PP RPC)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lag", ["0", "1"])
def test_pp_is_refused_clearly(tiny_model: Path, lag: str):
    run = run_vllm_fail(tiny_model, [*FLAGS, "--pipeline-parallel-size", "2", "--kv-eviction-lag", lag])
    assert run.returncode == 2, run.output[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("vllm-namm: error:")]
    assert len(lines) == 1 and "--pipeline-parallel-size" in lines[0], run.stderr[-3000:]
    assert "Traceback" not in run.output


# ---------------------------------------------------------------------------------------------
# tensor parallel 2 with --kv-eviction none: vLLM's own engine, the plugin dormant
# ---------------------------------------------------------------------------------------------
def test_tp2_with_eviction_off_is_token_identical_to_tp1(
    server_pool: ServerPool, tiny_model: Path, reference
):
    server = server_pool.get("tp2-none", tiny_model, ["--kv-eviction", "none", "--tensor-parallel-size", "2"])
    assert "NammScheduler" not in server.log_text()
    got = {"none": complete(server, PROMPT, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)["choices"][0]}
    for n in (5, 700):
        got[f"short-{n}"] = complete(server, text(n, 10 + (n == 700)), max_tokens=32, logprobs=1)["choices"][
            0
        ]
    for name, choice in got.items():
        assert choice["token_ids"] == reference[name]["ids"], name
        lps = choice["logprobs"]["token_logprobs"]
        assert max(abs(a - b) for a, b in zip(lps, reference[name]["logprobs"], strict=True)) < 1e-3, name
