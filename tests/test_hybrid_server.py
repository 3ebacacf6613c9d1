"""A hybrid model served with eviction (issue 29): a tiny random Gemma 3 through real ``vllm serve``.

The model (6 layers: 5 sliding-window of 256 tokens, 1 full attention; built here with
transformers) is, to vLLM, six KV-cache groups sharing one block pool. Eviction frees pages in the
full-attention group only; vLLM frees the sliding-window groups' out-of-window blocks itself. Read
from vLLM's own KV gauge while a request is held mid-decode (:class:`servers.Hold`), never by
polling:

* ``--kv-eviction namm`` (shipped weights) and ``--kv-eviction streaming`` hold fewer blocks than
  ``none`` (the same server, ``vllm_xargs`` ``kv_eviction: none``), and every policy generates the
  tokens asked for;
* the pool returns to where it started after aborted streams and after a workload that makes
  vLLM preempt (a small pool: ``--num-gpu-blocks-override``);
* a model eviction cannot serve (every layer sliding-window; sliding-window layers with vLLM's
  hybrid KV-cache manager off) stops ``vllm serve`` with one line and exit code 2, before any
  engine starts.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import pytest
from servers import (
    BLOCK_SIZE,
    HOLD_FLAGS,
    ServerPool,
    VllmServer,
    complete,
    engine_errors,
    metric_sum,
    namm_summary,
    run_vllm_fail,
    settled_usage,
    text,
    usage_while_decoding,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(1500)]

WINDOW = 256
HELD_AT = 16
EVICTION_LOG = (
    "eviction on 1 layers in 1 KV-cache group(s) (shared pages; 5 sliding-window group(s) left to vLLM)"
)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory, server_pool: ServerPool) -> Path:
    from benchmarks.tiny_model import build_random_gemma3

    return build_random_gemma3(tmp_path_factory.mktemp("gemma3") / "g", seed=0, sliding_window=WINDOW)


def check_saving_and_counts(server: VllmServer, policy_xargs: dict, prompt_len: int, seed: int) -> None:
    """The held request holds fewer blocks under the policy than under ``none``, and every policy
    generates the tokens asked for; aborting the held streams gives every block back."""
    start = settled_usage(server)
    prompt = text(prompt_len, seed)
    decode = server.max_model_len - prompt_len - 64  # far more than is decoded before the abort
    none = usage_while_decoding(server, prompt, decode, HELD_AT, vllm_xargs={"kv_eviction": "none"})
    kept = usage_while_decoding(server, prompt, decode, HELD_AT, vllm_xargs=policy_xargs)
    full_group = -(-(prompt_len + HELD_AT) // BLOCK_SIZE)  # what the full-attention group holds under none
    assert none.blocks >= full_group - 0.5, (none, full_group)
    # the saving lies in the full-attention group; the sliding-window groups hold the same under both
    assert none.blocks - kept.blocks >= full_group / 3, (none, kept, full_group)
    for xargs in ({"kv_eviction": "none"}, policy_xargs):
        r = complete(server, prompt, max_tokens=48, ignore_eos=True, vllm_xargs=xargs)
        assert r["usage"]["completion_tokens"] == 48 and len(r["choices"][0]["token_ids"]) == 48, r["usage"]
    # the aborts included: back to where it started, which is an empty pool
    end, block = settled_usage(server), 1 / server.num_blocks()
    assert end == pytest.approx(start, abs=0.5 * block) and end == pytest.approx(0.0, abs=0.5 * block), (
        start,
        end,
    )
    assert not engine_errors(server), engine_errors(server)[:20]


# ---------------------------------------------------------------------------------------------
# namm
# ---------------------------------------------------------------------------------------------
def test_namm_serves_the_hybrid_model_and_saves_in_its_full_attention_group(
    server_pool: ServerPool, gemma3: Path
):
    server = server_pool.get("gemma3-namm", gemma3, ["--kv-eviction", "namm", *HOLD_FLAGS])
    assert EVICTION_LOG in server.log_text()
    r = complete(server, text(3000, 1), max_tokens=16, ignore_eos=True)
    s = namm_summary(r)  # NAMM scored the full-attention layer and freed pages there
    # 3000 tokens span 5 intervals; a step begun while the previous one computes (lag 2) waits
    assert s["eviction_steps"] >= 3 and s["evicted_blocks"] > 0, s
    assert s["logical_blocks"] == -(-3016 // BLOCK_SIZE), s  # one evicted group: the full-attention one
    check_saving_and_counts(server, {}, 3000, 2)


# ---------------------------------------------------------------------------------------------
# streaming, small pool: preemption
# ---------------------------------------------------------------------------------------------
STREAMING_SMALL_POOL = [
    "--kv-eviction",
    "streaming",
    "--kv-eviction-budget",
    "256",
    "--max-model-len",
    "2048",
    "--max-num-batched-tokens",
    "512",
    "--num-gpu-blocks-override",
    "240",
    "--max-num-seqs",
    "8",
    *HOLD_FLAGS,
]


@pytest.fixture(scope="module")
def streaming_server(server_pool: ServerPool, gemma3: Path) -> VllmServer:
    return server_pool.get("gemma3-streaming", gemma3, STREAMING_SMALL_POOL)


def test_streaming_serves_the_hybrid_model_and_saves(streaming_server: VllmServer):
    assert EVICTION_LOG in streaming_server.log_text()
    check_saving_and_counts(streaming_server, {}, 1200, 3)


def test_preempted_hybrid_requests_complete_and_every_block_comes_back(streaming_server: VllmServer):
    """8 requests of 300 prompt + 1500 generated tokens. A request is admitted with ~60 blocks (10 of
    the full-attention group, ~10 per sliding-window group); decoding, each grows to ~78 (up to 28
    full-attention blocks under the 256-token budget): 4 fit in 240 blocks at admission, not once
    grown, so vLLM must preempt. No timing: the counters and the gauge are read after every request ended."""
    server = streaming_server
    start = settled_usage(server)
    preempted = metric_sum(server.metrics(), "vllm:num_preemptions_total")

    def go(i: int) -> dict:
        return complete(server, text(300, 100 + i), max_tokens=1500, ignore_eos=True)

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(go, range(8)))
    assert metric_sum(server.metrics(), "vllm:num_preemptions_total") - preempted >= 1, "no preemption"
    for r in results:
        assert r["usage"]["completion_tokens"] == 1500
        s = namm_summary(r)  # eviction resumed after preemption: budget pages + sink + writing + tail
        assert s["held_blocks"] <= 256 // BLOCK_SIZE + 4 + 512 // BLOCK_SIZE, s
    end, block = settled_usage(server), 1 / server.num_blocks()
    assert end == pytest.approx(start, abs=0.5 * block) and end == pytest.approx(0.0, abs=0.5 * block), (
        start,
        end,
    )
    assert not engine_errors(server), engine_errors(server)[:20]


# ---------------------------------------------------------------------------------------------
# refused before any engine starts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refusals(gemma3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from benchmarks.tiny_model import build_random_gemma3

    all_sliding = build_random_gemma3(tmp_path_factory.mktemp("sliding") / "s", layers=2, sliding_every=100)
    flags = ["--kv-eviction", "streaming", "--kv-eviction-budget", "512"]
    cases = {
        "all-sliding": (all_sliding, flags, "every attention layer of gemma3_text has a sliding window (256"),
        "hybrid-manager-off": (
            gemma3,
            [*flags, "--disable-hybrid-kv-cache-manager"],
            "hybrid KV-cache manager is off",
        ),
    }
    with cf.ThreadPoolExecutor(len(cases)) as ex:
        runs = {name: ex.submit(run_vllm_fail, model, f) for name, (model, f, _) in cases.items()}
        return {name: (runs[name].result(), cases[name][2]) for name in cases}


@pytest.mark.parametrize("case", ["all-sliding", "hybrid-manager-off"])
def test_unsupported_model_stops_before_any_engine_starts(refusals: dict, case: str):
    run, needle = refusals[case]
    assert run.returncode == 2, run.output[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("vllm-namm: error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert "--kv-eviction cannot serve this model" in lines[0] and needle in lines[0], lines[0]
    for sign in ("EngineCore", "Starting to load model", "Loading weights", "Traceback"):
        assert sign not in run.output, f"{sign!r} in the output: an engine started\n{run.output[-3000:]}"
