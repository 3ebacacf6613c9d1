"""Serving benchmark: the same long-prompt workload against one ``vllm serve`` per eviction mode.

Why: eviction is only worth its cost if freed KV pages turn into more requests running at
once on the same memory. Every mode therefore gets the same model, the same prompts and the
same number of KV blocks (``--num-gpu-blocks-override``: ``VLLM_CPU_KVCACHE_SPACE`` only takes
whole GiB, far too coarse to make a tiny model short of memory), and every figure is shown
beside ``--kv-eviction none`` from the same run.

Measured per mode: KV blocks in use and requests running (``/metrics`` sampled every
``--sample-interval`` s: ``vllm:kv_cache_usage_perc`` x usable blocks), preemptions, output
throughput, TTFT and TPOT (streamed responses, client clock) and the mean retained fraction
(``vllm_namm:retained_fraction`` histogram; requests that never evicted count as 1.0).

Usage::

    python -m benchmarks serving                                   # defaults: see --help
    python -m benchmarks serving --modes none streaming:ratio=0.25 namm h2o:budget=1024 \\
        --num-requests 16 --prompt-tokens 2048 --max-tokens 32 --kv-capacity-requests 4
    python -m benchmarks serving --tensor-parallel-size 2 --modes none streaming:budget=512   # 2 workers each

A mode is ``POLICY[:key=value,...]`` with keys budget, ratio, interval, weights, threshold,
sink, recent, page_rule, selection, page_score, granularity, layer_budget (the matching ``--kv-eviction-*`` / ``--namm-*``
flags) and watermark (vLLM's ``--watermark``: the fraction of KV blocks kept free when admitting
requests), e.g. ``snapkv:ratio=0.25,selection=token,page_rule=majority``.

``--tasks realtext`` draws the prompts from the real-text tasks (held-out seeds, the model's chat
template) and scores each answer, so the table shows what a mode's extra concurrency costs in
answers, in the same run. The answer is the text of a request's first tokens, as many as its task
asks for (the requests run on with ``ignore_eos``, so every mode decodes the same number of
tokens). The table also gives the KV memory per running request and a *modelled* memory-bound
decode throughput (stated in the table; never a measured accelerator figure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel as _PydanticBase
from pydantic import ConfigDict, Field

from benchmarks.launch import CPU_DEFAULTS, ROOT, VllmServer, metric_label
from benchmarks.launch import parse_metrics as launch_parse_metrics
from benchmarks.results import command_line, markdown_table, results_dir, time_stamp

TRAINED_MODEL = ROOT / "benchmarks" / "models" / "namm-tiny-llama"
POLICIES = ("none", "namm", "h2o", "l2", "streaming", "snapkv")
MODE_KEYS = {
    "budget": "--kv-eviction-budget",
    "ratio": "--kv-eviction-ratio",
    "interval": "--kv-eviction-interval",
    "weights": "--namm-weights",
    "threshold": "--namm-threshold",
    "sink": "--kv-eviction-sink-tokens",
    "recent": "--kv-eviction-recent-tokens",
    "page_rule": "--kv-eviction-page-rule",
    "lag": "--kv-eviction-lag",
    "kernels": "--namm-kernels",
    "selection": "--kv-eviction-selection",
    "page_score": "--kv-eviction-page-score",
    "granularity": "--kv-eviction-granularity",
    "layer_budget": "--kv-eviction-layer-budget",
    "watermark": "--watermark",  # vLLM's own: KV blocks kept free when admitting requests
    "block": "--block-size",  # vLLM's own: tokens per KV block (= eviction page)
}
VLLM_KEYS = ("watermark", "block")
"""Mode keys that are vLLM's own flags: ``none`` takes them too (plain vLLM with that setting)."""
DEFAULT_MODES = ["none", "streaming:ratio=0.25", "namm"]


class BaseModel(_PydanticBase):
    """Results may hold inf (all-at-once arrival) and nan (no TPOT): keep them in the JSON."""

    model_config = ConfigDict(ser_json_inf_nan="constants")


# ---------------------------------------------------------------------------------------------
# modes and servers (shared with benchmarks.quality)
# ---------------------------------------------------------------------------------------------
class Mode(BaseModel):
    """One server configuration, parsed from ``POLICY[:key=value,...]``."""

    spec: str
    policy: str
    options: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Mode:
        policy, _, rest = spec.partition(":")
        if policy not in POLICIES:
            raise ValueError(f"mode {spec!r}: policy must be one of {', '.join(POLICIES)}")
        options: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key not in MODE_KEYS:
                raise ValueError(f"mode {spec!r}: expected key=value with key in {', '.join(MODE_KEYS)}")
            options[key] = value
        if policy == "none" and set(options) - set(VLLM_KEYS):
            raise ValueError(f"mode {spec!r}: 'none' takes only vLLM's own options ({', '.join(VLLM_KEYS)})")
        return cls(spec=spec, policy=policy, options=options)

    def server_flags(self) -> list[str]:
        """Plugin flags; ``none`` passes no plugin flag at all, so the baseline is plain vLLM."""
        flags = [] if self.policy == "none" else ["--kv-eviction", self.policy]
        for key, value in self.options.items():
            flags += [MODE_KEYS[key], value]
        return flags


class ServerHandle(BaseModel):
    url: str
    log: Path
    command: list[str]
    startup_s: float


@contextlib.contextmanager
def vllm_server(
    model: Path,
    flags: list[str],
    *,
    log: Path,
    kv_space_gib: int,
    max_model_len: int,
    block_size: int,
    num_blocks: int | None = None,
    timeout_s: float = 600.0,
    tensor_parallel_size: int = 1,
) -> Iterator[ServerHandle]:
    """Start ``vllm serve`` on a free port, wait for /health, and always stop it (even on Ctrl-C).

    ``tensor_parallel_size`` > 1: that many workers (the launcher sets the CPU thread binding)."""
    base = [
        *CPU_DEFAULTS,
        "--max-model-len",
        str(max_model_len),
        "--block-size",
        str(block_size),
        "--seed",
        "0",
    ]
    if num_blocks is not None:
        base += ["--num-gpu-blocks-override", str(num_blocks)]
    t0 = time.monotonic()
    with VllmServer(
        model,
        flags,
        log_path=log,
        base_flags=base,
        timeout_s=timeout_s,
        kv_space_gib=kv_space_gib,
        tensor_parallel_size=tensor_parallel_size,
    ) as server:
        yield ServerHandle(url=server.url, log=log, command=server.command, startup_s=time.monotonic() - t0)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name: value}, summing a series over its labels (one engine here)."""
    out: dict[str, float] = {}
    for series, value in launch_parse_metrics(text).items():
        name = series.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + value
    return out


def total_blocks_from(metrics_text: str, log: Path, block_size: int) -> int:
    """Usable KV blocks: ``num_gpu_blocks`` of ``vllm:cache_config_info`` (or the log) minus the null block."""
    n = metric_label(launch_parse_metrics(metrics_text), "vllm:cache_config_info", "num_gpu_blocks")
    if n not in (None, "", "None"):
        return int(n) - 1
    m = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text())
    if m:
        return int(m.group(1).replace(",", "")) // block_size
    raise RuntimeError(f"cannot find the number of KV blocks in /metrics nor in {log}")


def default_model(out_dir: Path) -> Path:
    """The trained model when present, else a tiny random Llama built into the output dir."""
    if (TRAINED_MODEL / "config.json").exists():
        return TRAINED_MODEL
    from benchmarks.tiny_model import build_random_llama

    path = out_dir / "tiny-random-llama"
    if not (path / "config.json").exists():
        build_random_llama(path)
    return path


def token_counter(model: Path) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    return lambda s: len(tok.encode(s, add_special_tokens=False))


# ---------------------------------------------------------------------------------------------
# result formats
# ---------------------------------------------------------------------------------------------
class ServingConfig(BaseModel):
    model: str
    modes: list[str]
    num_requests: int
    prompt_tokens: int
    max_tokens: int
    request_rate: float  # requests/s (Poisson); inf = all at once
    kv_capacity_requests: float
    num_blocks: int  # --num-gpu-blocks-override (incl. vLLM's null block)
    kv_space_gib: int
    block_size: int
    max_model_len: int
    task_kinds: list[str]
    seed: int
    sample_interval_s: float
    tensor_parallel_size: int = 1
    tasks: Literal["synthetic", "realtext"] = "synthetic"
    essays: str | None = None
    kv_bytes_per_token: int | None = None
    """KV cache bytes one token takes in every layer (K and V, served dtype)."""
    weights_bytes: int | None = None
    """Bytes of the model's weights files: what a memory-bound decode step reads besides the KV."""


class RequestRecord(BaseModel):
    index: int
    sent_s: float  # relative to the run start
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    tpot_s: float | None  # (last - first token time) / (output_tokens - 1)
    error: str | None = None
    answer_text: str | None = None
    """realtext: the text of the first tokens, as many as the task asks for."""
    correct: float | None = None


class Sample(BaseModel):
    t_s: float
    kv_usage: float
    kv_blocks: float
    running: int
    waiting: int


class ModeSummary(BaseModel):
    peak_kv_blocks: float
    mean_kv_blocks: float  # over samples while any request was unfinished
    max_running: int
    mean_running: float
    output_tok_per_s: float
    requests_per_s: float
    mean_ttft_s: float
    p90_ttft_s: float
    mean_tpot_s: float
    mean_e2e_s: float
    mean_retained_fraction: float
    evicting_requests: int
    evicted_blocks: int
    preemptions: int
    failed_requests: int
    wall_s: float
    accuracy: float | None = None
    """realtext: mean score of the answers (failed requests count as wrong)."""
    kv_mib_per_request: float | None = None
    """Mean KV memory per running request: mean blocks in use / mean requests running."""


class ModeResult(BaseModel):
    mode: str
    policy: str
    server_command: list[str]
    server_log: str
    startup_s: float
    total_blocks: int
    summary: ModeSummary
    requests: list[RequestRecord]
    samples: list[Sample]


class ServingReport(BaseModel):
    command: str
    started: str
    config: ServingConfig
    results: list[ModeResult]
    table: str = ""


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def build_realtext(cfg: ServingConfig, model: Path) -> list[Any]:
    """Held-out real-text samples, one per request, kinds in turn (their chat template opens every
    prompt, so the first block is shared by prefix caching, alike in every mode)."""
    from evolve.tasks.realtext import load_tokenizer, make_sample

    tok = load_tokenizer(str(model))
    return [
        make_sample(
            cfg.task_kinds[i % len(cfg.task_kinds)],
            cfg.seed + i,
            cfg.prompt_tokens,
            tok,
            essays_dir=cfg.essays,
        )
        for i in range(cfg.num_requests)
    ]


def model_shape(model: Path) -> dict[str, int]:
    """Attention geometry from ``config.json`` (a multimodal config nests it in ``text_config``)."""
    cfg = json.loads((model / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    heads = cfg["num_attention_heads"]
    return {
        "layers": cfg["num_hidden_layers"],
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
    }


def kv_bytes_per_token(model: Path, dtype_bytes: int = 4) -> int | None:
    """K and V of one token in every layer (float32 on the CPU build); None for an unreadable config."""
    try:
        shape = model_shape(model)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * dtype_bytes


def check_realtext_inputs(model: Path, essays: Path | None, kinds: list[str], seeds: list[int]) -> Path:
    """Check what real-text prompts are built from, for the benchmarks that ask them; returns the
    essays folder. Raises ``AssetError`` (a model or essays folder) or ``ValueError`` (a kind, or a
    seed in the gap between training and held-out seeds), each message naming the problem."""
    from evolve.assets import ESSAYS_DIR, check_essays_dir, check_model_dir
    from evolve.tasks.realtext import REALTEXT_KINDS, seed_split

    bad = [k for k in kinds if k not in REALTEXT_KINDS]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a realtext kind ({', '.join(REALTEXT_KINDS)})")
    check_model_dir(model)
    folder = check_essays_dir(essays or ESSAYS_DIR)
    for seed in seeds:
        seed_split(seed)
    return folder


def memory_bound_ratio(mode: ModeSummary, base: ModeSummary, cfg: ServingConfig) -> float | None:
    """Modelled decode tok/s of ``mode`` over ``base`` on a memory-bound accelerator, at the
    concurrency measured here: a decode step reads the weights once and each running request's KV,
    so tok/s ~ running / (weights + running x KV per request). A stated model, not a measurement."""
    if cfg.weights_bytes is None or None in (mode.kv_mib_per_request, base.kv_mib_per_request):
        return None

    def rate(s: ModeSummary) -> float:
        return s.mean_running / (cfg.weights_bytes + s.mean_running * s.kv_mib_per_request * 2**20)

    return rate(mode) / rate(base) if base.mean_running > 0 else None


def build_prompts(cfg: ServingConfig, count_tokens: Callable[[str], int]) -> list[str]:
    """Synthetic long prompts, each opened by a unique tag.

    The synthetic tasks share a header line; without the tag, vLLM's prefix cache would share
    those first blocks between requests, and the block counts would measure prefix caching
    as well as eviction.
    """
    from evolve.tasks.synthetic import make_sample

    prompts = []
    for i in range(cfg.num_requests):
        tag = f"[request {i}]\n"
        sample = make_sample(
            cfg.task_kinds[i % len(cfg.task_kinds)],
            cfg.seed + i,
            cfg.prompt_tokens - count_tokens(tag),
            count_tokens,
        )
        prompts.append(tag + sample.prompt)
    return prompts


async def _one_request(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    max_tokens: int,
    index: int,
    t_run: float,
    delay: float,
    done: Callable[[], None],
    answer_tokens: int | None = None,
) -> RequestRecord:
    await asyncio.sleep(delay)
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    usage: dict[str, int] = {}
    error: str | None = None
    answer: list[str] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = str(chunk["error"])[:300]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if chunk.get("choices") and answer_tokens and len(answer) < answer_tokens:
                        answer.append(chunk["choices"][0].get("text") or "")  # one chunk per token
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
    except httpx.HTTPError as e:  # a dead engine: record it, the summary reports failures
        error = f"{type(e).__name__}: {e}"
    done()
    n_out = int(usage.get("completion_tokens", 0))
    if error is None and n_out != max_tokens:
        error = f"got {n_out} of {max_tokens} tokens (ignore_eos is set)"
    first = first or last
    return RequestRecord(
        index=index,
        sent_s=t0 - t_run,
        ttft_s=first - t0,
        e2e_s=last - t0,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        output_tokens=n_out,
        tpot_s=(last - first) / (n_out - 1) if n_out > 1 else None,
        error=error,
        answer_text="".join(answer) if answer_tokens else None,
    )


def _sampler(
    url: str,
    total_blocks: int,
    t_run: float,
    interval: float,
    samples: list[Sample],
    stop: threading.Event,
    ready: threading.Event,
    bar: Any,
) -> None:
    """Scrape /metrics from a thread of its own, so a busy client event loop cannot delay samples.

    The first scrape happens before ``ready`` lets the workload start, so even a sub-second
    run has samples from its start on.
    """
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                m = parse_metrics(client.get("/metrics").text)
                usage = m.get("vllm:kv_cache_usage_perc", 0.0)
                s = Sample(
                    t_s=time.perf_counter() - t_run,
                    kv_usage=usage,
                    kv_blocks=usage * total_blocks,
                    running=int(m.get("vllm:num_requests_running", 0)),
                    waiting=int(m.get("vllm:num_requests_waiting", 0)),
                )
                samples.append(s)
                if bar is not None:
                    bar.set_postfix(
                        kv_blocks=f"{s.kv_blocks:.0f}/{total_blocks}", running=s.running, refresh=False
                    )
            ready.set()
            if stop.wait(interval):
                break


def _arrivals(cfg: ServingConfig) -> list[float]:
    if math.isinf(cfg.request_rate):
        return [0.0] * cfg.num_requests
    rng = random.Random(cfg.seed)
    t, out = 0.0, []
    for _ in range(cfg.num_requests):
        out.append(t)
        t += rng.expovariate(cfg.request_rate)
    return out


async def _run_workload(
    url: str,
    model: str,
    prompts: list[str],
    cfg: ServingConfig,
    total_blocks: int,
    label: str,
    answer_tokens: list[int | None],
) -> tuple[list[RequestRecord], list[Sample], dict[str, float], float]:
    from tqdm import tqdm

    limits = httpx.Limits(max_connections=cfg.num_requests + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        # warm-up (first-request overheads), then the metric baseline the run is measured against
        # (its own text: a prefix-cache hit on a workload prompt would change what is measured)
        warm = {"model": model, "prompt": "warm-up " * 8, "max_tokens": 2, "temperature": 0.0}
        (await client.post("/v1/completions", json=warm)).raise_for_status()
        before = parse_metrics((await client.get("/metrics")).text)
        samples: list[Sample] = []
        stop, ready = threading.Event(), threading.Event()
        bar = tqdm(total=len(prompts), desc=f"{label:>24}", unit="req", file=sys.stderr, dynamic_ncols=True)
        t_run = time.perf_counter()
        sampler = threading.Thread(
            target=_sampler,
            args=(url, total_blocks, t_run, cfg.sample_interval_s, samples, stop, ready, bar),
            daemon=True,
        )
        sampler.start()
        await asyncio.to_thread(ready.wait, 60)
        try:
            records = await asyncio.gather(
                *(
                    _one_request(client, model, p, cfg.max_tokens, i, t_run, d, lambda: bar.update(1), k)
                    for i, (p, d, k) in enumerate(zip(prompts, _arrivals(cfg), answer_tokens, strict=True))
                )
            )
        finally:
            wall = time.perf_counter() - t_run
            stop.set()
            sampler.join()
            bar.close()
        after = parse_metrics((await client.get("/metrics")).text)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return list(records), samples, delta, wall


def summarise(
    all_records: list[RequestRecord],
    samples: list[Sample],
    delta: dict[str, float],
    wall: float,
    kv_bytes_per_token: int | None = None,
    block_size: int = 0,
) -> ModeSummary:
    """Latencies over successful requests; throughput counts only tokens actually received."""

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    records = [r for r in all_records if r.error is None] or all_records

    end = max(r.sent_s + r.e2e_s for r in records)
    live = [s for s in samples if s.t_s <= end] or samples
    ttfts = sorted(r.ttft_s for r in records)
    n = len(records)
    n_all = len(all_records)
    n_evicting = int(round(delta.get("vllm_namm:retained_fraction_count", 0.0)))
    retained_sum = delta.get("vllm_namm:retained_fraction_sum", 0.0)
    scored = [r.correct if r.error is None else 0.0 for r in all_records if r.answer_text is not None]
    mean_blocks, mean_running = mean([s.kv_blocks for s in live]), mean([float(s.running) for s in live])
    kv_mib = (
        mean_blocks / mean_running * block_size * kv_bytes_per_token / 2**20
        if kv_bytes_per_token and mean_running > 0
        else None
    )
    return ModeSummary(
        peak_kv_blocks=max((s.kv_blocks for s in samples), default=0.0),
        mean_kv_blocks=mean_blocks,
        max_running=max((s.running for s in samples), default=0),
        mean_running=mean_running,
        output_tok_per_s=sum(r.output_tokens for r in all_records) / wall,
        requests_per_s=n / wall,
        mean_ttft_s=mean(ttfts),
        p90_ttft_s=ttfts[min(n - 1, int(0.9 * n))],
        mean_tpot_s=mean([r.tpot_s for r in records if r.tpot_s is not None]),
        mean_e2e_s=mean([r.e2e_s for r in records]),
        mean_retained_fraction=(retained_sum + max(n_all - n_evicting, 0)) / n_all,
        evicting_requests=n_evicting,
        evicted_blocks=int(round(delta.get("vllm_namm:evicted_blocks_total", 0.0))),
        preemptions=int(round(delta.get("vllm:num_preemptions_total", 0.0))),
        failed_requests=sum(r.error is not None for r in all_records),
        wall_s=wall,
        accuracy=mean([c or 0.0 for c in scored]) if scored else None,
        kv_mib_per_request=kv_mib,
    )


def run_mode(
    mode: Mode,
    model: Path,
    prompts: list[str],
    cfg: ServingConfig,
    out_dir: Path,
    startup_timeout_s: float,
    samples: list[Any] | None = None,
) -> ModeResult:
    """One server, the whole workload; with ``samples`` (real text) every answer is scored."""
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", mode.spec)
    with vllm_server(
        model,
        mode.server_flags(),
        log=out_dir / f"server-{safe}.log",
        kv_space_gib=cfg.kv_space_gib,
        max_model_len=cfg.max_model_len,
        block_size=cfg.block_size,
        num_blocks=cfg.num_blocks,
        timeout_s=startup_timeout_s,
        tensor_parallel_size=cfg.tensor_parallel_size,
    ) as server:
        total = total_blocks_from(
            httpx.get(f"{server.url}/metrics", timeout=30).text, server.log, cfg.block_size
        )
        served = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
        answer_tokens = [s.max_tokens for s in samples] if samples else [None] * len(prompts)
        records, scrapes, delta, wall = asyncio.run(
            _run_workload(server.url, served, prompts, cfg, total, mode.spec, answer_tokens)
        )
    if samples:
        from evolve.tasks.realtext import score_answer

        for r, s in zip(records, samples, strict=True):
            r.correct = score_answer(r.answer_text or "", s)
    return ModeResult(
        mode=mode.spec,
        policy=mode.policy,
        server_command=server.command,
        server_log=str(server.log),
        startup_s=server.startup_s,
        total_blocks=total,
        summary=summarise(records, scrapes, delta, wall, cfg.kv_bytes_per_token, cfg.block_size),
        requests=records,
        samples=scrapes,
    )


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
ROWS: list[tuple[str, str, str]] = [  # (label, field, format)
    ("peak KV blocks in use", "peak_kv_blocks", "{:.0f}"),
    ("mean KV blocks in use", "mean_kv_blocks", "{:.1f}"),
    ("max requests running", "max_running", "{:d}"),
    ("mean requests running", "mean_running", "{:.2f}"),
    ("output tok/s", "output_tok_per_s", "{:.1f}"),
    ("mean TTFT (s)", "mean_ttft_s", "{:.2f}"),
    ("p90 TTFT (s)", "p90_ttft_s", "{:.2f}"),
    ("mean TPOT (ms)", "mean_tpot_s", "{:.1f}"),
    ("mean retained fraction", "mean_retained_fraction", "{:.3f}"),
    ("KV MiB per running request", "kv_mib_per_request", "{:.1f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("preemptions", "preemptions", "{:d}"),
    ("failed requests", "failed_requests", "{:d}"),
    ("wall time (s)", "wall_s", "{:.1f}"),
]


def format_table(report: ServingReport) -> str:
    """Plain-text table (pastes into a README): each cell is the value and its ratio to ``none``."""
    results = report.results
    base = next((r for r in results if r.policy == "none"), None)
    header = ["metric"] + [r.mode for r in results]
    lines: list[list[str]] = []
    for label, field, fmt in ROWS:
        if all(getattr(r.summary, field) is None for r in results):
            continue  # accuracy without --tasks realtext, KV size of an unreadable config
        row = [label]
        for r in results:
            v = getattr(r.summary, field)
            if v is None:
                row.append("-")
                continue
            shown = v * 1000 if field == "mean_tpot_s" else v
            cell = fmt.format(shown)
            if base is not None and r is not base:
                b = getattr(base.summary, field)
                if b and not math.isnan(b) and not math.isnan(v):
                    cell += f" ({v / b:.2f}x)"
            row.append(cell)
        lines.append(row)
    c = report.config
    if base is not None and c.weights_bytes:
        modelled = [memory_bound_ratio(r.summary, base.summary, c) for r in results]
        if any(m is not None for m in modelled):
            lines.append(
                ["modelled memory-bound tok/s vs none"]
                + ["-" if m is None else f"{m:.2f}x" for m in modelled]
            )
    rate = "all at once" if math.isinf(c.request_rate) else f"{c.request_rate:g} req/s"
    out = [
        f"{c.num_requests} requests x {c.prompt_tokens} prompt tokens, max_tokens {c.max_tokens}, arrival {rate}; "
        f"{results[0].total_blocks if results else c.num_blocks - 1} KV blocks of {c.block_size} tokens "
        f"(~{c.kv_capacity_requests:g} full requests); model {Path(c.model).name}",
        *markdown_table(header, lines),
    ]
    if c.tasks == "realtext":
        out.append(
            f"prompts: held-out real-text tasks ({', '.join(c.task_kinds)}; seeds {c.seed}+i), scored on the "
            "first tokens of each answer"
        )
    if c.weights_bytes and base is not None:
        out.append(
            "modelled (not measured): decode on a memory-bound accelerator reads the weights "
            f"({c.weights_bytes / 2**20:.0f} MiB) and every running request's KV per step, so "
            "tok/s ~ running / (weights + running x KV per request), at the concurrency measured here"
        )
    out.append(f"command: {report.command}")
    return "\n".join(out)


def plot(report: ServingReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for r in report.results:
        t = [s.t_s for s in r.samples]
        ax1.plot(t, [s.kv_blocks for s in r.samples], label=r.mode)
        ax2.step(t, [s.running for s in r.samples], where="post", label=r.mode)
    if report.results:
        ax1.axhline(report.results[0].total_blocks, color="grey", ls=":", lw=1, label="KV blocks available")
    ax1.set_ylabel("KV blocks in use")
    ax2.set_ylabel("requests running")
    ax2.set_xlabel("time since first request (s)")
    ax1.legend(fontsize=8)
    ax1.set_title(
        f"{report.config.num_requests} x {report.config.prompt_tokens}-token prompts, "
        f"{report.results[0].total_blocks if report.results else '?'} KV blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks serving",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"model dir (default: {TRAINED_MODEL.relative_to(ROOT)} if present, else a tiny random "
        "Llama built into the output dir)",
    )
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, help="POLICY[:key=value,...] per server")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals (req/s); inf = all at once"
    )
    p.add_argument(
        "--kv-capacity-requests",
        type=float,
        default=4.0,
        help="KV blocks given to every server, in full-length requests (prompt + max_tokens)",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="usable KV blocks (overrides --kv-capacity-requests); passed as --num-gpu-blocks-override + 1",
    )
    p.add_argument(
        "--kv-space-gib",
        type=int,
        default=1,
        help="VLLM_CPU_KVCACHE_SPACE (whole GiB only in vLLM 0.32; the block count is what limits)",
    )
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument(
        "--tasks",
        choices=["synthetic", "realtext"],
        default="synthetic",
        help="realtext: prompts from the real-text tasks in the model's chat template, each answer scored "
        "(accuracy beside the serving figures)",
    )
    p.add_argument(
        "--task-kinds",
        nargs="+",
        default=None,
        help="default: passkey kv_retrieval needle (synthetic), every real-text kind (realtext)",
    )
    p.add_argument(
        "--essays", type=Path, default=None, help="realtext: essays folder (default: the fetched one)"
    )
    p.add_argument("--seed", type=int, default=10**9)
    p.add_argument("--sample-interval", type=float, default=0.2, help="seconds between /metrics samples")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="workers per server (vLLM's --tensor-parallel-size; on CPU the thread binding is set here)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default benchmarks/results/serving-<time>)"
    )
    args = p.parse_args(argv)
    if args.tensor_parallel_size < 1:
        p.error("--tensor-parallel-size must be >= 1")
    return args


def check_realtext_args(args: argparse.Namespace) -> str | None:
    """Fill in the real-text defaults (SmolLM2, every kind); the one line naming bad input, or None."""
    from evolve.assets import SMOLLM2_DIR, AssetError
    from evolve.tasks.realtext import REALTEXT_KINDS, seed_split

    args.model = args.model or SMOLLM2_DIR
    args.task_kinds = args.task_kinds or list(REALTEXT_KINDS)
    try:
        args.essays = check_realtext_inputs(args.model, args.essays, args.task_kinds, [args.seed])
        if seed_split(args.seed) != "heldout":
            raise ValueError(f"--seed {args.seed} is a training seed; held-out seeds start at 10**9")
    except AssetError as e:
        return str(e)
    except ValueError as e:
        return f"benchmarks serving: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("python -m benchmarks serving", argv)
    modes = [Mode.parse(m) for m in args.modes]
    if any("block" in m.options for m in modes):  # the pool is sized in blocks of --block-size
        raise SystemExit("benchmarks serving: use --block-size for every mode, not block= in one")
    if args.tasks == "realtext" and (error := check_realtext_args(args)):
        print(error, file=sys.stderr)
        return 2
    stamp = time_stamp()
    out_dir: Path = args.out or results_dir("serving", stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.task_kinds = args.task_kinds or ["passkey", "kv_retrieval", "needle"]
    model = (args.model or default_model(out_dir)).resolve()
    full_len = args.prompt_tokens + args.max_tokens
    blocks_per_request = -(-full_len // args.block_size)
    usable = args.kv_blocks or max(1, round(args.kv_capacity_requests * blocks_per_request))
    # max_model_len must fit in the cache, or vLLM refuses to start
    max_model_len = min(
        -(-(full_len + args.block_size) // args.block_size) * args.block_size, usable * args.block_size
    )
    if max_model_len < full_len:
        raise SystemExit(f"{usable} KV blocks cannot hold one {full_len}-token request; raise --kv-blocks")
    cfg = ServingConfig(
        model=str(model),
        modes=[m.spec for m in modes],
        num_requests=args.num_requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        request_rate=args.request_rate,
        kv_capacity_requests=usable / blocks_per_request,
        num_blocks=usable + 1,
        kv_space_gib=args.kv_space_gib,
        block_size=args.block_size,
        max_model_len=max_model_len,
        task_kinds=args.task_kinds,
        seed=args.seed,
        sample_interval_s=args.sample_interval,
        tensor_parallel_size=args.tensor_parallel_size,
        tasks=args.tasks,
        essays=str(args.essays) if args.essays else None,
        kv_bytes_per_token=kv_bytes_per_token(model),
        weights_bytes=sum(f.stat().st_size for f in model.glob("*.safetensors")) or None,
    )
    samples = build_realtext(cfg, model) if args.tasks == "realtext" else None
    prompts = [s.prompt for s in samples] if samples else build_prompts(cfg, token_counter(model))
    tp = f", tensor parallel {args.tensor_parallel_size}" if args.tensor_parallel_size > 1 else ""
    print(
        f"model {model}\n{len(modes)} servers{tp}, {usable} KV blocks each; logs in {out_dir}",
        file=sys.stderr,
    )
    report = ServingReport(command=command, started=stamp, config=cfg, results=[])
    json_path = out_dir / "serving.json"
    for mode in modes:
        report.results.append(run_mode(mode, model, prompts, cfg, out_dir, args.startup_timeout, samples))
        json_path.write_text(report.model_dump_json(indent=1))  # partial results survive a crash
    report.table = format_table(report)
    json_path.write_text(report.model_dump_json(indent=1))
    try:
        plot(report, out_dir / "kv_usage.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
    print(report.table)
    print(f"results: {json_path}", file=sys.stderr)
    failed = [r for r in report.results if r.summary.failed_requests]
    for r in failed:
        first = next(q.error for q in r.requests if q.error)
        print(
            f"WARNING: {r.summary.failed_requests} requests of mode {r.mode} failed (first: {first}); "
            f"see {r.server_log}",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
