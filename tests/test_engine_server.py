"""Acceptance checks of the paged-eviction engine (issue 4) against real ``vllm serve`` processes.

Every check talks to a real server (tiny random Llama, char tokenizer: 1 char = 1 token, block
size 32) through the OpenAI client or raw HTTP. Servers come from the session ``server_pool``
(one live at a time); tests are ordered by server configuration so each starts once:

    cli (no server) -> disabled plugin -> --kv-eviction none -> streaming -> namm -> namm (all-negative)

KV blocks are read from vLLM's own ``vllm:kv_cache_usage_perc`` gauge (x ``num_gpu_blocks``)
and from the ``kv_transfer_params["namm"]`` summary a finished request returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from servers import (
    BLOCK_SIZE,
    BUDGET,
    HOLD_FLAGS,
    SINKS,
    STREAMING_FLAGS,
    FailedRun,
    ServerPool,
    VllmServer,
    complete,
    concurrent_mixed_requests_with_aborts,
    engine_errors,
    metric_sum,
    namm_summary,
    run_vllm,
    run_vllm_fail,
    settled_usage,
    text,
    usage_while_decoding,
)

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]


# ---------------------------------------------------------------------------------------------
# CLI: help and bad flags (no server stays up)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FailedRun, str]]:
    """``vllm serve --help=all`` and three bad start-ups, run side by side (each ~20 s of imports)."""
    d = tmp_path_factory.mktemp("bad_flags")
    corrupt = d / "corrupt.safetensors"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    missing = d / "does-not-exist.safetensors"
    with cf.ThreadPoolExecutor(4) as ex:
        futures = {
            "help": (ex.submit(run_vllm, ["serve", "--help=all"]), ""),
            "bogus": (ex.submit(run_vllm_fail, tiny_model, ["--kv-eviction", "bogus"]), "bogus"),
            "missing": (
                ex.submit(
                    run_vllm_fail, tiny_model, ["--kv-eviction", "namm", "--namm-weights", str(missing)]
                ),
                str(missing),
            ),
            "corrupt": (
                ex.submit(
                    run_vllm_fail, tiny_model, ["--kv-eviction", "namm", "--namm-weights", str(corrupt)]
                ),
                str(corrupt),
            ),
        }
        return {k: (f.result(), what) for k, (f, what) in futures.items()}


def test_help_lists_eviction_flags(cli_runs):
    run, _ = cli_runs["help"]
    assert run.returncode == 0, run.output[-3000:]
    for flag in (
        "--kv-eviction",
        "--namm-weights",
        "--namm-threshold",
        "--kv-eviction-interval",
        "--kv-eviction-budget",
        "--kv-eviction-ratio",
        "--kv-eviction-sink-tokens",
        "--kv-eviction-recent-tokens",
        "--kv-eviction-page-rule",
    ):
        assert flag in run.stdout, f"{flag} missing from `vllm serve --help=all`"
    assert "vllm-namm KV eviction" in run.stdout
    assert "{none,namm,h2o,l2,streaming,snapkv}" in run.stdout


def _clear_error_line(run: FailedRun, *needles: str) -> str:
    lines = [ln for ln in run.output.splitlines() if "error" in ln.lower() and all(n in ln for n in needles)]
    assert lines, f"no error line naming {needles} in the output:\n{run.output[-4000:]}"
    return lines[0]


def test_bad_policy_flag_exits_with_clear_error(cli_runs):
    run, _ = cli_runs["bogus"]
    assert run.returncode not in (None, 0), f"rc={run.returncode}\n{run.output[-3000:]}"
    line = _clear_error_line(run, "--kv-eviction", "bogus")
    assert "invalid choice" in line


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_bad_weights_file_exits_with_clear_error(cli_runs, case):
    run, path = cli_runs[case]
    assert run.returncode is not None, f"vllm serve did not exit within the timeout:\n{run.output[-3000:]}"
    assert run.returncode != 0, run.output[-3000:]
    line = _clear_error_line(run, path)
    expect = "no such weights file" if case == "missing" else "not a safetensors file"
    assert expect in line, line


# ---------------------------------------------------------------------------------------------
# --kv-eviction none == plugin disabled
# ---------------------------------------------------------------------------------------------
NONE_PROMPTS = [("short", text(5, 1)), ("mid", text(100, 2)), ("long", text(700, 3)), ("2k", text(2048, 4))]
NONE_LONG = text(3000, 5)


def greedy_outputs(server: VllmServer) -> dict[str, tuple[list[int], list[float], str]]:
    out = {}
    for name, prompt in NONE_PROMPTS:
        r = complete(server, prompt, max_tokens=32, logprobs=1)
        choice = r["choices"][0]
        out[name] = (choice["token_ids"], choice["logprobs"]["token_logprobs"], choice["finish_reason"])
    return out


@pytest.fixture(scope="module")
def disabled_server_results(server_pool: ServerPool, tiny_model: Path) -> dict[str, Any]:
    """The same model served with the plugin not loaded (VLLM_PLUGINS allowlist matching nothing)."""
    server = server_pool.get("disabled", tiny_model, [], env={"VLLM_PLUGINS": ""})
    assert "vllm_namm" not in server.log_text()
    return {"outputs": greedy_outputs(server)}


@pytest.fixture(scope="module")
def none_server(server_pool: ServerPool, tiny_model: Path, disabled_server_results) -> VllmServer:
    return server_pool.get("none", tiny_model, ["--kv-eviction", "none", *HOLD_FLAGS])


DECODE_TOKENS, AT = 4000, 16
"""KV usage while decoding is read with 16 of 4000 tokens generated (the request held there)."""


@pytest.fixture(scope="module")
def none_running_usage(none_server: VllmServer) -> dict[str, float]:
    reading = usage_while_decoding(none_server, NONE_LONG, DECODE_TOKENS, AT)
    return {"blocks": reading.blocks, "num_blocks": none_server.num_blocks()}


def test_vllm_serve_starts_with_plugin(none_server: VllmServer):
    assert none_server.healthy()
    models = none_server.client.models.list()
    assert [m.id for m in models.data] == [none_server.model]
    r = none_server.client.completions.create(
        model=none_server.model, prompt="hello", max_tokens=4, temperature=0
    )
    assert r.choices[0].finish_reason in ("length", "stop")
    # --kv-eviction none: vLLM's scheduler, no eviction summary
    assert "NammScheduler" not in none_server.log_text()
    assert (r.model_extra or {}).get("kv_transfer_params") is None


def test_none_is_token_identical_to_plugin_disabled(none_server: VllmServer, disabled_server_results):
    ours = greedy_outputs(none_server)
    ref = disabled_server_results["outputs"]
    for name, _ in NONE_PROMPTS:
        ids, lps, fin = ours[name]
        rids, rlps, rfin = ref[name]
        assert ids == rids, f"{name}: tokens differ\nnone:     {ids}\ndisabled: {rids}"
        assert fin == rfin
        assert len(ids) == 32 or fin == "stop"
        assert max(abs(a - b) for a, b in zip(lps, rlps, strict=True)) <= 1e-5, (name, lps, rlps)


def test_none_server_rejects_per_request_eviction(none_server: VllmServer):
    import openai

    with pytest.raises(openai.BadRequestError, match="kv-eviction none"):
        none_server.client.completions.create(
            model=none_server.model,
            prompt="abc",
            max_tokens=2,
            extra_body={"vllm_xargs": {"kv_eviction": "streaming", "kv_eviction_budget": 64}},
        )
    assert none_server.healthy()


def test_none_server_usage_baseline(none_running_usage):
    # A 3000-token prompt holds all of its ~95 blocks while decoding without eviction.
    assert none_running_usage["blocks"] >= math.ceil(3000 / BLOCK_SIZE) - 0.5, none_running_usage


# ---------------------------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def streaming_server(server_pool: ServerPool, tiny_model: Path, none_running_usage) -> VllmServer:
    return server_pool.get("streaming", tiny_model, [*STREAMING_FLAGS, *HOLD_FLAGS])


@pytest.fixture(scope="module")
def streaming_start_usage(streaming_server: VllmServer) -> float:
    return streaming_server.kv_usage()


def test_streaming_holds_budget_pages_after_prefill(streaming_server: VllmServer, streaming_start_usage):
    resp = complete(streaming_server, text(3200, 10), max_tokens=8, ignore_eos=True)
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == 8
    s = namm_summary(resp)
    limit = math.ceil(BUDGET / BLOCK_SIZE) + 2
    assert s["logical_blocks"] == math.ceil((3200 + 7) / BLOCK_SIZE)
    assert s["held_blocks"] <= limit, s
    assert s["held_blocks"] >= 2
    assert s["evicted_blocks"] == s["logical_blocks"] - s["held_blocks"], s
    assert 0 < s["token_evictions_realised"] <= s["token_evictions_requested"], s
    assert s["retained_fraction"] == pytest.approx(s["held_blocks"] / s["logical_blocks"])


def test_streaming_usage_lower_than_none_while_running(
    streaming_server: VllmServer, none_running_usage, streaming_start_usage
):
    """vLLM's own gauge while a 3000-token prompt decodes (at its 16th token): the streaming
    request holds its budget, far below ``none``."""
    n = streaming_server.num_blocks()
    assert n == none_running_usage["num_blocks"]
    idle = settled_usage(streaming_server) * n
    running = usage_while_decoding(streaming_server, text(3000, 11), DECODE_TOKENS, AT).blocks - idle
    limit = math.ceil(BUDGET / BLOCK_SIZE) + 2 + 1  # + the decode page
    assert running <= limit + 0.5, (
        f"streaming request holds {running:.1f} blocks while decoding (limit {limit})"
    )
    assert running < none_running_usage["blocks"] - 50, (running, none_running_usage)


def test_streaming_metrics_exported(streaming_server: VllmServer):
    m = streaming_server.metrics()
    assert metric_sum(m, "vllm_namm:evicting_requests_total") >= 1
    assert metric_sum(m, "vllm_namm:evicted_blocks_total") > 0
    assert metric_sum(m, "vllm_namm:retained_fraction_count") >= 1
    assert metric_sum(m, "vllm_namm:token_evictions_realised_total") <= metric_sum(
        m, "vllm_namm:token_evictions_requested_total"
    )


def test_streaming_usage_returns_to_start(streaming_server: VllmServer, streaming_start_usage):
    for seed in (20, 21):
        complete(streaming_server, text(2600, seed), max_tokens=16)
    end = settled_usage(streaming_server)
    assert end == pytest.approx(streaming_start_usage, abs=0.5 / streaming_server.num_blocks()), (
        f"KV usage {end} after all requests finished, {streaming_start_usage} at start (leak/double free)"
    )
    assert not engine_errors(streaming_server), engine_errors(streaming_server)[:20]


@pytest.mark.parametrize(
    "xargs, needle",
    [
        ({"kv_eviction": "bogus"}, "kv_eviction"),
        ({"kv_eviction_budget": -3}, "kv_eviction_budget"),
        ({"kv_eviction_ratio": 1.5}, "kv_eviction_ratio"),
        ({"kv_eviction_typo": 1}, "kv_eviction_typo"),
        ({"kv_eviction": "streaming", "kv_eviction_budget": 256, "kv_eviction_ratio": 0.5}, "exactly one"),
        ({"namm_params": [0.0, 1.0]}, "namm_params"),
    ],
    ids=["bogus-policy", "negative-budget", "ratio>1", "unknown-key", "budget+ratio", "params-not-namm"],
)
def test_bad_vllm_xargs_is_400(streaming_server: VllmServer, xargs, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        streaming_server.client.completions.create(
            model=streaming_server.model, prompt="abc", max_tokens=2, extra_body={"vllm_xargs": xargs}
        )
    assert needle in str(e.value)
    assert streaming_server.healthy()


def test_streaming_matches_hf_reference(streaming_server: VllmServer, tiny_model: Path):
    """Page-aligned streaming (32 sink tokens, budget 512, 1536-token prompt, interval 512):
    page-level eviction keeps exactly the reference runner's tokens, so greedy tokens must agree.

    Each prompt is fresh (never seen by this server): a prefix-cache hit would bring KV computed
    over a context the reference never had (e.g. cached by a non-evicting request).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vllm_namm.config import BudgetConfig, EvictionConfig, ProtectConfig
    from vllm_namm.policies import make_policy
    from vllm_namm.reference import generate

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = LlamaForCausalLM.from_pretrained(
        tiny_model, attn_implementation="eager", torch_dtype=torch.float32
    ).eval()
    n_new = 32
    results = {}
    for name, seed, cfg, xargs in [
        (
            "streaming",
            30,
            EvictionConfig(
                policy="streaming",
                budget=BudgetConfig(tokens=BUDGET),
                protect=ProtectConfig(sink_tokens=SINKS),
            ),
            None,
        ),
        ("none", 31, EvictionConfig(), {"kv_eviction": "none"}),
    ]:
        prompt = tok(text(1536, seed))["input_ids"]
        assert len(prompt) == 1536
        ref = generate(model, None, prompt, make_policy(cfg), n_new, cfg)
        extra = {"ignore_eos": True} | ({"vllm_xargs": xargs} if xargs else {})
        resp = complete(streaming_server, prompt, max_tokens=len(ref.tokens), **extra)
        got = resp["choices"][0]["token_ids"]
        same = next(
            (i for i, (a, b) in enumerate(zip(got, ref.tokens, strict=False)) if a != b),
            min(len(got), len(ref.tokens)),
        )
        results[name] = {
            "matching_prefix": same,
            "n": len(ref.tokens),
            "vllm": got,
            "ref": ref.tokens,
            "ref_cache": ref.prompt_cache_lengths,
            "summary": (resp.get("kv_transfer_params") or {}).get("namm"),
        }
    print(
        "\nHF reference vs vLLM:",
        json.dumps(
            {
                k: {kk: v[kk] for kk in ("matching_prefix", "n", "ref_cache", "summary")}
                for k, v in results.items()
            }
        ),
    )
    stream = results["streaming"]
    assert stream["ref_cache"] == [BUDGET, BUDGET]  # per layer and KV head, right after the prompt
    s = stream["summary"]
    # pages 1..32 freed (steps at 1024 and 1536); held: page 0, pages 33..47, decode page 48
    assert s is not None and s["evicted_blocks"] == 32 and s["held_blocks"] == 17, s
    assert s["token_evictions_realised"] == s["token_evictions_requested"], s  # page-aligned: nothing lost
    assert results["none"]["matching_prefix"] == results["none"]["n"], results["none"]
    assert stream["matching_prefix"] == stream["n"], stream


def test_concurrent_mixed_requests_with_aborts(streaming_server: VllmServer):
    """Concurrent mixed requests, 12 of them aborted mid-flight (see the helper): every KV block
    comes back."""
    concurrent_mixed_requests_with_aborts(streaming_server)


# ---------------------------------------------------------------------------------------------
# namm
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def namm_server(server_pool: ServerPool, tiny_model: Path) -> VllmServer:
    return server_pool.get("namm", tiny_model, ["--kv-eviction", "namm"])  # shipped evolved weights


def test_namm_shipped_weights_evict_and_complete(namm_server: VllmServer):
    start = namm_server.kv_usage()
    resp = complete(namm_server, text(3000, 60), max_tokens=16, ignore_eos=True)
    assert resp["choices"][0]["finish_reason"] == "length"
    s = namm_summary(resp)
    assert s["token_evictions_requested"] > 0, s
    assert s["evicted_blocks"] > 0, s
    assert s["held_blocks"] >= 2 and s["held_blocks"] < s["logical_blocks"], s
    assert settled_usage(namm_server) == pytest.approx(start, abs=0.5 / namm_server.num_blocks())
    assert not engine_errors(namm_server), engine_errors(namm_server)[:20]


def test_namm_per_request_params(namm_server: VllmServer):
    import openai

    from vllm_namm.policies import DEFAULT_WEIGHTS
    from vllm_namm.weights import load_weights

    n = load_weights(DEFAULT_WEIGHTS).params.numel()
    with pytest.raises(openai.BadRequestError, match="namm_params"):
        namm_server.client.completions.create(
            model=namm_server.model,
            prompt="abc",
            max_tokens=2,
            extra_body={"vllm_xargs": {"namm_params": [0.0] * (n - 1)}},
        )
    with pytest.raises(openai.BadRequestError, match="namm_threshold"):
        namm_server.client.completions.create(
            model=namm_server.model,
            prompt="abc",
            max_tokens=2,
            extra_body={"vllm_xargs": {"namm_threshold": "nan"}},
        )
    assert namm_server.healthy()
    # A zero candidate scores every token 0: with threshold 0 it keeps everything, with 1 it evicts
    # everything it may (only sink/recent pages stay).
    keep = complete(
        namm_server,
        text(2100, 61),
        max_tokens=4,
        ignore_eos=True,
        vllm_xargs={"namm_params": [0.0] * n, "namm_threshold": 0.0},
    )
    drop = complete(
        namm_server,
        text(2100, 62),
        max_tokens=4,
        ignore_eos=True,
        vllm_xargs={"namm_params": [0.0] * n, "namm_threshold": 1.0},
    )
    sk = namm_summary(keep)  # eviction steps ran (a summary) and freed nothing
    assert sk["eviction_steps"] >= 1 and sk["evicted_blocks"] == 0, sk
    sd = namm_summary(drop)
    assert 2 <= sd["held_blocks"] <= 4 and sd["evicted_blocks"] > 0, sd


@pytest.fixture(scope="module")
def all_negative_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Zero BAM (every score exactly 0) with threshold 1: every score is below the threshold."""
    from vllm_namm.policies import NammPolicy
    from vllm_namm.weights import NammWeights, load_weights, save_weights

    w = NammWeights.zeros()
    w.threshold = 1.0
    path = tmp_path_factory.mktemp("weights") / "all_negative.safetensors"
    save_weights(path, w)
    pol = NammPolicy(load_weights(path))
    assert pol.threshold == 1.0 and pol.num_params == 4172
    return path


@pytest.fixture(scope="module")
def namm_negative_server(server_pool: ServerPool, tiny_model: Path, all_negative_weights: Path) -> VllmServer:
    return server_pool.get(
        "namm_negative", tiny_model, ["--kv-eviction", "namm", "--namm-weights", str(all_negative_weights)]
    )


def test_namm_all_negative_scores_keep_sink_and_recent(namm_negative_server: VllmServer):
    server = namm_negative_server
    start = server.kv_usage()
    prompt_len, new = 3000, 24
    resp = complete(server, text(prompt_len, 70), max_tokens=new, ignore_eos=True)
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["completion_tokens"] == new
    s = namm_summary(resp)
    assert s["held_blocks"] >= 2, s  # the first (sink) page and the page being written
    assert s["held_blocks"] <= 4, s
    assert s["evicted_blocks"] == s["logical_blocks"] - s["held_blocks"], s
    assert settled_usage(server) == pytest.approx(start, abs=0.5 / server.num_blocks())
    assert not engine_errors(server), engine_errors(server)[:20]
