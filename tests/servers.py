"""Helpers for the tests that run a real ``vllm serve`` on the tiny model (no fixtures: see conftest).

* Servers: :class:`VllmServer` (the tiny-model flags), :class:`ServerPool` (one live server at a
  time), :func:`run_vllm` / :func:`run_vllm_fail` (a ``vllm`` command that must exit by itself).
* Requests: :func:`complete`, :func:`namm_summary`, :func:`text`, :func:`engine_errors`.
* Moments that cannot be missed, on a loaded 2-core machine too (issue 31):

  - :func:`wait_until` / :func:`wait_idle` / :func:`settled_usage` wait for a state that lasts
    once reached (no request running), never for a moment;
  - :class:`Hold` freezes the engine at a request's N-th decode token (the test-only logits
    processor :mod:`hold_decode`, loaded by servers started with :data:`HOLD_FLAGS`), so the
    request is still running, at a known position, for as long as the test looks at it.
    :func:`usage_while_decoding` reads vLLM's KV gauge that way.

  Why not polling for a moment: the engine decodes the tiny model at hundreds of tokens per
  second, and a busy API server can fall seconds behind it and answer no scrape meanwhile
  (one took 14 s while 5 000 tokens were decoded), so any window of tokens can pass unseen.
* :func:`concurrent_mixed_requests_with_aborts`: the abort/prefix-cache workload, run against
  the streaming server of ``test_engine_server`` and the TP=2 server.
* :func:`llm_results`: a batch of greedy requests through an in-process ``vllm.LLM`` (the cheapest
  full engine: ~6 s to start, against ~20 s for ``vllm serve``), in a subprocess of its own.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from benchmarks.launch import ROOT, free_port, metric_label, metric_sum, parse_metrics, vllm_bin
from benchmarks.launch import VllmServer as _LaunchServer

__all__ = ["free_port", "metric_label", "metric_sum", "parse_metrics"]

BLOCK_SIZE = 32
# Flags every tiny test server gets (CPU backend: block size must be a multiple of 32).
BASE_FLAGS: tuple[str, ...] = (
    "--enforce-eager",
    "--dtype",
    "float32",
    "--max-model-len",
    "8192",
    "--block-size",
    str(BLOCK_SIZE),
)
TESTS = Path(__file__).resolve().parent
HOLD_FLAGS: tuple[str, ...] = ("--logits-processors", "hold_decode:HoldDecode")
"""Flags of the servers a :class:`Hold` is used on (every test server finds :mod:`hold_decode`)."""
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
WAIT_S = 300.0
"""How long a wait for a lasting state may take before it fails: long, because it only ever
bounds a hang (a loaded 2-core machine can be slow, never wrong)."""

BUDGET = 512
SINKS = 32  # page-aligned sinks: page-level streaming == token-level streaming
# lag 0 (synchronous steps): the HF reference runner frees tokens the moment it decides, and the
# greedy tokens are compared with it; the namm servers of test_engine_server run the default lag.
STREAMING_FLAGS = [
    "--kv-eviction",
    "streaming",
    "--kv-eviction-budget",
    str(BUDGET),
    "--kv-eviction-sink-tokens",
    str(SINKS),
    "--kv-eviction-lag",
    "0",
]
ALPHABET = "abcdefghijklmnopqrstuvwxyz ,.;:!?ABCDEFGHIJ0123456789\n"


# ---------------------------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------------------------
class VllmServer(_LaunchServer):
    """:class:`benchmarks.launch.VllmServer` with the tiny-model flags and environment of the tests,
    :mod:`hold_decode` on its path, and HTTP time-outs that only bound a hang (a busy machine
    answers slowly, not wrongly)."""

    def __init__(
        self,
        model: str | Path,
        flags: Sequence[str] = (),
        *,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        base_flags: Sequence[str] = BASE_FLAGS,
        timeout_s: float = 600.0,
    ) -> None:
        path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(
            model,
            flags,
            log_path=log_path,
            env=DEFAULT_ENV | {"PYTHONPATH": path} | dict(env or {}),
            base_flags=base_flags,
            timeout_s=timeout_s,
        )

    def model_name(self) -> str:
        return self.model

    @property
    def max_model_len(self) -> int:
        """``--max-model-len`` of the command line (the last one wins, as in vLLM's parser)."""
        args = [*self.base_flags, *self.flags]
        lens = [int(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--max-model-len"]
        assert lens, "the server's model length is not on its command line"
        return lens[-1]

    def healthy(self, timeout: float = 120.0) -> bool:
        return super().healthy(timeout=timeout)

    def metrics_text(self) -> str:
        r = requests.get(self.url + "/metrics", timeout=WAIT_S)
        r.raise_for_status()
        return r.text


@dataclass
class FailedRun:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_vllm_fail(
    model: str | Path,
    flags: Sequence[str],
    *,
    timeout_s: float = 600.0,
    env: Mapping[str, str] | None = None,
    base_flags: Sequence[str] = BASE_FLAGS,
) -> FailedRun:
    """Run ``vllm serve MODEL *flags`` expecting it to exit by itself; kill it at ``timeout_s``.

    ``returncode`` is None when it had to be killed (it did not exit by itself). The time-out only
    tells a hang from an exit: several ``vllm`` imports side by side on a busy 2-core machine
    take minutes.
    """
    return run_vllm(
        ["serve", str(model), *base_flags, "--host", "127.0.0.1", "--port", str(free_port()), *flags],
        timeout_s=timeout_s,
        env=env,
    )


def run_vllm(
    args: Sequence[str], *, timeout_s: float = 600.0, env: Mapping[str, str] | None = None
) -> FailedRun:
    """Run ``vllm *args`` with a timeout (killed at ``timeout_s``: returncode None); capture its output."""
    cmd = [vllm_bin(), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ) | DEFAULT_ENV | dict(env or {}),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rc = None
    return FailedRun(rc, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0)


class ServerPool:
    """At most one live server; ``get(key, ...)`` reuses it if ``key`` matches, else restarts."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.key: str | None = None
        self.server: VllmServer | None = None
        self.starts: dict[str, int] = {}

    def get(
        self,
        key: str,
        model: str | Path,
        flags: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        base_flags: Sequence[str] = BASE_FLAGS,
    ) -> VllmServer:
        if self.server is not None and self.key == key and self.server.alive:
            return self.server
        self.close()
        n = self.starts[key] = self.starts.get(key, 0) + 1
        server = VllmServer(
            model, flags, env=env, log_path=self.log_dir / f"{key}-{n}.log", base_flags=base_flags
        )
        server.start()
        self.key, self.server = key, server
        return server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------
def text(n: int, seed: int) -> str:
    """``n`` random characters (= ``n`` tokens of the tiny model's character tokenizer)."""
    rng = random.Random(seed)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def complete(
    server: VllmServer, prompt: str | list[int], max_tokens: int = 8, **extra: Any
) -> dict[str, Any]:
    """POST /v1/completions (greedy) and return the JSON; raises on HTTP errors."""
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": True,
    } | extra
    r = requests.post(server.base_url + "/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text[:2000]
    return r.json()


def namm_summary(resp: dict[str, Any]) -> dict[str, Any]:
    """The eviction summary a finished request returns; fails when there is none."""
    params = resp.get("kv_transfer_params") or {}
    assert "namm" in params, f"finished request has no eviction summary: kv_transfer_params={params!r}"
    return params["namm"]


def engine_errors(server: VllmServer) -> list[str]:
    bad = re.compile(r"Traceback|\bERROR\b|already free|evicted twice|EngineDeadError|double free")
    return [line for line in server.log_text().splitlines() if bad.search(line)]


# ---------------------------------------------------------------------------------------------
# /metrics
# ---------------------------------------------------------------------------------------------
def metric_where(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include every ``labels`` item."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v for k, v in metrics.items() if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
    )


def running(metrics: Mapping[str, float]) -> int:
    return round(metric_sum(metrics, "vllm:num_requests_running"))


def waiting(metrics: Mapping[str, float]) -> int:
    return round(metric_sum(metrics, "vllm:num_requests_waiting"))


def wait_until(
    server: VllmServer, condition: Callable[[dict[str, float]], bool], what: str, timeout: float = WAIT_S
) -> dict[str, float]:
    """Scrape ``/metrics`` until ``condition`` holds; returns that scrape.

    Only for states that last once reached (the server idle; the step of a held request), never
    to catch a moment: a late scrape still sees them. ``timeout`` bounds a hang.
    """
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if condition(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not reached after {timeout:.0f}s (running {running(m)}, waiting {waiting(m)})"
            )
        time.sleep(0.2)


def wait_idle(server: VllmServer, timeout: float = WAIT_S) -> dict[str, float]:
    """Until no request is running or waiting (aborts are processed asynchronously).

    Cannot flake: the gauges are published with every engine step, and an abort makes the engine
    run one more step (it reports the finished request), so "idle" is published and then stays.
    """
    return wait_until(server, lambda m: running(m) == 0 and waiting(m) == 0, "server idle", timeout)


def settled_usage(server: VllmServer) -> float:
    """KV usage once idle; a 1-token request first refreshes the gauge (it is set per engine step).

    Cannot flake: the API server records a step's gauges before it hands that step's tokens to
    the request (no ``await`` between the two), so once the 1-token response is back the gauge
    shows the step that freed that request, and nothing runs after it.
    """
    wait_idle(server)
    complete(server, "refresh", max_tokens=1)
    wait_idle(server)
    return server.kv_usage()


# ---------------------------------------------------------------------------------------------
# a request held at a decode position
# ---------------------------------------------------------------------------------------------
class Hold:
    """One request's hold point: send ``xargs`` with it (on a server started with
    :data:`HOLD_FLAGS`) and the engine stops before its token ``at`` + 1 until :meth:`release`.

    While held, nothing runs: the request holds its blocks, the API server catches up, and every
    scrape shows the held state. Each request is held once; others wait with it.
    """

    def __init__(self, at: int) -> None:
        self.at = at
        self.folder = Path(tempfile.mkdtemp(prefix="hold-"))

    @property
    def xargs(self) -> dict[str, Any]:
        return {"hold_at": self.at, "hold_dir": str(self.folder)}

    def wait_held(self, timeout: float = WAIT_S) -> dict[str, int]:
        """Until a worker holds the request (a lasting state); returns its note: the request's
        ``tokens`` and the ``batch`` (requests in the engine's running batch)."""
        deadline = time.monotonic() + timeout
        while not (notes := sorted(self.folder.glob("held-*[0-9]"))):
            assert time.monotonic() < deadline, (
                f"the request was not held at token {self.at} in {timeout:.0f}s"
            )
            time.sleep(0.01)
        return json.loads(notes[0].read_text())

    def release(self) -> None:
        (self.folder / "release").touch()


@dataclass(frozen=True)
class DecodeReading:
    """vLLM's own KV gauge while a request decodes."""

    usage: float
    """``vllm:kv_cache_usage_perc`` (0..1)."""
    blocks: float
    """``usage`` x the pool's blocks."""
    generated: int
    """Tokens the request had generated (``vllm:generation_tokens_total``, the server's only one)."""


def usage_while_decoding(
    server: VllmServer, prompt: str, max_tokens: int, at: int = 16, **extra: Any
) -> DecodeReading:
    """vLLM's KV gauge while ``prompt`` decodes, with ``at`` of its ``max_tokens`` tokens generated.

    The request streams (``ignore_eos``) and is held at token ``at`` (:class:`Hold`); the gauge
    is read from a scrape that shows the held step: the request running, alone, with ``at``
    tokens generated (the API server records a step's gauges with its token counts). Then the
    stream is closed (the request aborted) and the engine released. Nothing to catch in time:
    the state lasts until the release. ``extra``'s ``vllm_xargs`` are sent with the hold's.
    """
    assert 0 < at < max_tokens
    n = server.num_blocks()
    gen0 = metric_sum(wait_idle(server), "vllm:generation_tokens_total")
    hold = Hold(at)
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    } | extra
    body["vllm_xargs"] = dict(extra.get("vllm_xargs") or {}) | hold.xargs
    r = requests.post(server.base_url + "/completions", json=body, stream=True, timeout=600)
    try:
        assert r.status_code == 200, r.text[:2000]
        note = hold.wait_held()
        assert note["tokens"] == at and note["batch"] == 1, note
        m = wait_until(
            server,
            lambda m: round(metric_sum(m, "vllm:generation_tokens_total") - gen0) == at and running(m) == 1,
            f"the held request's step (token {at}) on /metrics",
        )
    finally:
        r.close()  # the client leaves: the request is aborted once released
        hold.release()
    usage = metric_sum(m, "vllm:kv_cache_usage_perc")
    return DecodeReading(usage, usage * n, at)


# ---------------------------------------------------------------------------------------------
# the abort workload
# ---------------------------------------------------------------------------------------------
def _finished(metrics: Mapping[str, float]) -> float:
    """Requests that ran to their ``max_tokens`` (vLLM does not count a client's abort here)."""
    return metric_where(metrics, "vllm:request_success_total", finished_reason="length")


def _stream_then_close(server: VllmServer, body: dict[str, Any], n: int) -> int:
    """Stream ``body`` (held at token ``n``), read ``n`` tokens, close the stream, then release."""
    hold = Hold(n)
    body = body | {"stream": True, "return_token_ids": True}
    body["vllm_xargs"] = dict(body.get("vllm_xargs") or {}) | hold.xargs
    got = 0
    r = requests.post(server.base_url + "/completions", json=body, stream=True, timeout=600)
    try:
        assert r.status_code == 200, r.text[:2000]
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices", []):
                assert choice["finish_reason"] is None, choice  # held: thousands of tokens to go
                got += len(choice.get("token_ids") or [])
            if got >= n:
                break
    finally:
        r.close()
        hold.release()
    return got


def _send_and_give_up(server: VllmServer, body: dict[str, Any], leave: threading.Event) -> None:
    """Send a non-streaming request, then close the connection unread once ``leave`` is set."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    try:
        conn.request(
            "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert leave.wait(WAIT_S * 2), "never told to leave"
    finally:
        conn.close()


def concurrent_mixed_requests_with_aborts(server: VllmServer) -> None:
    """26 concurrent requests: shared long prefixes (prefix cache on), mixed lengths and settings,
    6 of them streams closed after 3 tokens; then 6 non-streaming clients that give up. The others
    complete, the server stays healthy and every KV block comes back (the server needs
    :data:`HOLD_FLAGS`).

    Every abort is mid-flight by construction, not by timing: each aborted request asks for
    thousands of tokens and is held (:class:`Hold`) until its client has left. A closed stream is
    held at its 3rd token until the client has read 3 tokens and closed it. The clients that give
    up (the non-streaming disconnect path) send one after the other, each request held at its
    8th token: at the 6th hold the engine's batch shows all 6 running, and all 6 clients leave
    before it goes on. The finished-request counter, read after everything ended, shows that
    exactly the 20 others finished.
    """
    import openai

    start = settled_usage(server)
    m0 = server.metrics()
    evicted_before = metric_sum(m0, "vllm_namm:evicted_blocks_total")
    finished_before = _finished(m0)
    shared = text(1100, 40)
    jobs: list[dict[str, Any]] = []
    for i in range(10):  # shared 1100-token prefix + own suffix
        jobs.append({"kind": "ok", "prompt": shared + text(50 + 40 * i, 100 + i), "max_tokens": 8 + 4 * i})
    for i in range(10):  # unique prompts, 40..1840 tokens
        jobs.append({"kind": "ok", "prompt": text(40 + 200 * i, 200 + i), "max_tokens": 12 + 3 * i})
    jobs[3]["xargs"] = {"kv_eviction_budget": 256}
    jobs[12]["xargs"] = {"kv_eviction": "none"}
    jobs[15]["xargs"] = {"kv_eviction_ratio": 0.25}
    for i in range(6):  # streams closed after 3 tokens, with thousands left
        prompt = (shared if i % 2 else "") + text(600 + 150 * i, 300 + i)
        jobs.append(
            {"kind": "close", "prompt": prompt, "max_tokens": server.max_model_len - len(prompt) - 64}
        )
    assert len(jobs) == 26
    clients = [openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=600) for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def run(job: dict[str, Any], client: openai.OpenAI) -> tuple[str, Any]:
        extra_body = {"ignore_eos": True} | ({"vllm_xargs": job["xargs"]} if "xargs" in job else {})
        kwargs = {"model": server.model, "prompt": job["prompt"], "max_tokens": job["max_tokens"]}
        barrier.wait(WAIT_S)
        if job["kind"] == "close":
            return ("closed", _stream_then_close(server, kwargs | {"temperature": 0} | extra_body, 3))
        return ("ok", client.completions.create(temperature=0, extra_body=extra_body, **kwargs))

    try:
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            results = list(ex.map(run, jobs, clients))
    finally:
        for client in clients:
            client.close()
    for job, (kind, r) in zip(jobs, results, strict=True):
        if job["kind"] == "ok":
            assert kind == "ok"
            choice = r.choices[0]
            assert choice.finish_reason == "length", choice
            assert r.usage.completion_tokens == job["max_tokens"]
        else:
            assert (kind, r) == ("closed", 3)

    wait_idle(server)
    leave = threading.Event()
    with cf.ThreadPoolExecutor(6) as ex:
        sent = []
        holds = [Hold(8) for _ in range(6)]
        try:
            for i, hold in enumerate(holds):
                prompt = text(1000, 400 + i) + (shared if i % 2 else "")
                body = {
                    "model": server.model,
                    "prompt": prompt,
                    "max_tokens": server.max_model_len - len(prompt) - 64,
                    "temperature": 0,
                    "ignore_eos": True,
                    "vllm_xargs": hold.xargs,
                }
                sent.append(ex.submit(_send_and_give_up, server, body, leave))
                note = hold.wait_held()  # the earlier ones run on: thousands of tokens left each
                assert note["batch"] == i + 1, f"request {i} held with {note['batch']} running, not {i + 1}"
                if i < len(holds) - 1:
                    hold.release()
            leave.set()
            for f in sent:
                f.result()  # every client has left, the engine still held
        finally:
            leave.set()
            for hold in holds:
                hold.release()

    m = wait_idle(server)
    finished = _finished(m) - finished_before
    assert finished == 20, f"{finished} requests finished: the 12 aborted ones must not have"
    assert server.healthy()
    assert metric_sum(m, "vllm_namm:evicted_blocks_total") > evicted_before, "no page was evicted"
    end = settled_usage(server)
    assert abs(end - start) <= 0.5 / server.num_blocks(), (
        f"KV usage {end} (x{server.num_blocks()} blocks) after everything finished, {start} before"
    )
    assert server.healthy()
    assert not engine_errors(server), engine_errors(server)[:20]
    # The server still serves correctly afterwards.
    r = complete(server, text(2100, 50), max_tokens=8, ignore_eos=True)
    assert r["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------------
# an in-process engine
# ---------------------------------------------------------------------------------------------
_LLM_SCRIPT = r"""
import json, random, sys
from vllm import LLM, SamplingParams
job = json.loads(sys.argv[1])
llm = LLM(job["model"], dtype="float32", enforce_eager=True, block_size=32, seed=0, **job["llm"])
alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:!?\n0123456789"
prompts, params = [], []
for n, seed, max_tokens, xargs in job["requests"]:
    rng = random.Random(seed)
    prompts.append("".join(rng.choice(alphabet) for _ in range(n)))
    params.append(SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0, extra_args=xargs))
outs = []
for _ in range(job["repeat"]):  # in turn: a later round may read what an earlier one cached
    outs += llm.generate(prompts, params)
print("RESULT " + json.dumps([
    {"ids": list(o.outputs[0].token_ids),
     "logprobs": [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs],
     "summary": (o.kv_transfer_params or {}).get("namm")}
    for o in outs]))
"""


def llm_results(
    model: str | Path,
    requests_: Sequence[tuple[int, int, int, Mapping[str, Any] | None]],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 900.0,
    repeat: int = 1,
    **llm_kwargs: Any,
) -> list[dict[str, Any]]:
    """Greedy requests ``(prompt characters, seed, max_tokens, vllm_xargs)`` batched through one
    ``vllm.LLM(model, **llm_kwargs)`` (float32, eager, block 32) in a subprocess, the batch ``repeat``
    times in turn; per request (round after round) its token ids, their log-probabilities and the
    eviction summary (None without eviction)."""
    job = {
        "model": str(model),
        "llm": dict(llm_kwargs),
        "requests": [list(r) for r in requests_],
        "repeat": repeat,
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LLM_SCRIPT, json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ) | DEFAULT_ENV | dict(env or {}),
        cwd=ROOT,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])
