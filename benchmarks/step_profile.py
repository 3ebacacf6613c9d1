"""Where an eviction step's time goes, at a real model's shapes: one request's prompt, step by step.

Why: ``benchmarks overhead`` times one step against one chunk's forward at 8B shapes; a user
serving SmolLM2 pays every step of every prompt. This replays what the engine does to one
request (or ``--requests`` requests due together) over a ``--prompt-tokens`` prompt, with the
engine's own code (:func:`vllm_namm.request_memory.begin_step`, :func:`~vllm_namm.eviction_batch.compute_steps`
over a paged cache in the CPU backend's key layout), and splits the time by phase:

* ``queries``: filing the captured queries and taking them for a step (engine thread);
* ``keys`` / ``columns``: gathering keys from the paged cache; the attention columns' GEMM + softmax;
* ``stft+ema``: NAMM's spectrogram and EMA; ``features``: normalisation and the oldness embedding;
* ``scorer``: NAMM's network over every (request, layer, KV head); ``policy``: a baseline's
  ``score`` (H2O's sums, SnapKV's pooling, streaming's ranks);
* ``protect+select``: protected tokens and token-level keep masks; ``page plan``: the page tallies
  and the decision; ``filter``: the policy states filtered with the plan; ``other``: the rest.

Times are CPU seconds of the calling thread (``time.thread_time``: with one torch thread all the work
runs on it), so other jobs on a shared machine do not inflate them. Keys and queries are random
(the work does not depend on their values; the pages freed do, a little, through the budget's
page ranks). ``--threads 1`` is what the eviction thread gets on a
2-core machine (vLLM keeps one core for the engine's OpenMP threads).

``python -m benchmarks step-profile --model models/smollm2-135m-instruct --policies namm h2o snapkv streaming``
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.launch import ROOT
from benchmarks.results import command_line, markdown_table, results_dir, time_stamp
from benchmarks.serving import model_shape

DEFAULT_MODEL = ROOT / "models" / "smollm2-135m-instruct"
PHASES = [
    "queries",
    "keys",
    "columns",
    "stft+ema",
    "features",
    "scorer",
    "policy",
    "protect+select",
    "page plan",
    "filter",
    "other",
]


class Timers:
    """Seconds per phase; nested phases count only towards the innermost one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        entry = [name, time.thread_time(), 0.0]  # name, start, time spent in inner phases
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.thread_time() - entry[1]
            self.seconds[name] += spent - entry[2]
            if self._stack:
                self._stack[-1][2] += spent

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        """Time every call of ``owner.attr`` as ``name``; returns the undo. A missing ``attr`` is
        skipped, so the same profile runs on an older tree (the *before* of a comparison)."""
        original = getattr(owner, attr, None)
        if original is None:
            return lambda: None

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)


@contextmanager
def timed_phases(timers: Timers) -> Iterator[None]:
    """Patch the step's building blocks (where the engine code looks them up) with timers."""
    import namm_kernels.paged_attention_columns as pac

    import vllm_namm.eviction_batch as eb
    import vllm_namm.kernels as vk
    import vllm_namm.policies.namm as namm
    from vllm_namm.page_votes import PageVotes
    from vllm_namm.policies import h2o, snapkv, streaming

    undo = [
        timers.wrap(vk, "gather_keys", "keys"),
        timers.wrap(pac, "gather_keys", "keys"),
        timers.wrap(vk, "attention_columns_paged", "columns"),
        timers.wrap(vk, "attention_columns_dense", "columns"),
        timers.wrap(vk, "attention_column_sums_dense", "columns"),
        timers.wrap(vk, "spectrogram_ema", "stft+ema"),
        timers.wrap(namm, "token_features", "features"),
        timers.wrap(namm, "score_ragged", "scorer"),
        timers.wrap(h2o.H2OPolicy, "score", "policy"),
        timers.wrap(snapkv.SnapKVPolicy, "score", "policy"),
        timers.wrap(streaming.StreamingPolicy, "score", "policy"),
        timers.wrap(eb, "protect", "protect+select"),
        timers.wrap(eb, "protected_mask", "protect+select"),
        timers.wrap(eb, "budget_votes", "page plan"),
        timers.wrap(eb, "rule_votes", "page plan"),
        timers.wrap(PageVotes, "decide", "page plan"),
    ]
    for cls in (namm.NammFeatureState, h2o.H2OState):
        undo.append(timers.wrap(cls, "filter", "filter"))
    for policy in (namm.NammPolicy, h2o.H2OPolicy, snapkv.SnapKVPolicy, streaming.StreamingPolicy):
        undo.append(timers.wrap(policy, "select", "protect+select"))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def policy_config(spec: str, interval: int) -> Any:
    from vllm_namm.config import EvictionConfig

    name, _, ratio = spec.partition("@")
    budget = {"ratio": float(ratio)} if ratio else ({"ratio": 0.25} if name != "namm" else None)
    return EvictionConfig(policy=name, budget=budget, interval=interval)


def replay(
    spec: str, shape: dict[str, int], prompt: int, interval: int, block: int, requests: int, seed: int = 0
) -> tuple[Timers, float, int, list[float]]:
    """One prompt per request, every step as the engine at lag 0 runs it; (timers, total s, steps, kept)."""
    from vllm_namm import kernels
    from vllm_namm.policies import make_policy
    from vllm_namm.request_memory import PagedCacheReader, RequestMemory, begin_step, compute_steps

    cfg = policy_config(spec, interval)
    policy = make_policy(cfg)
    L, H, K, D = shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator().manual_seed(seed)
    pages = -(-prompt // block)
    caches = []
    for _ in range(L):  # every request's pages side by side: request r owns blocks r*pages ...
        cache = torch.randn(requests * pages, K, block, 2 * D, generator=g)
        caches.append((cache, kernels.PagedKeyLayout.cpu(cache, "vec")))
    queries = [[torch.randn(prompt, H, D, generator=g) for _ in range(L)] for _ in range(requests)]
    scale = D**-0.5
    mems = [RequestMemory(policy, L, block) for _ in range(requests)]
    timers = Timers()
    steps = 0
    t0 = time.thread_time()
    with timed_phases(timers):
        for start in range(0, prompt, interval):
            end = min(prompt, start + interval)
            due = []
            for r, mem in enumerate(mems):
                with timers.phase("queries"):
                    mem.add_queries([q[start:end] for q in queries[r]], start)
                    if not mem.due(interval, prompt, policy.hop):
                        continue
                    blocks = torch.tensor([r * pages + p for p in mem.live_pages])
                    reader = PagedCacheReader(caches, blocks, scale)
                    due.append(begin_step(mem, reader, policy.hop, f"r{r}", interval))
            if due:
                with timers.phase("other"):
                    compute_steps(due, cfg, scale, K)
                for step in due:
                    step.finish()
                steps += len(due)
    total = time.thread_time() - t0
    kept = [len(m.live_pages) / m.logical_pages for m in mems]
    return timers, total, steps, kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks step-profile", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="only its config.json is read (shapes)")
    p.add_argument(
        "--policies", nargs="+", default=["namm", "h2o", "snapkv", "streaming"], help="POLICY[@ratio]"
    )
    p.add_argument("--prompt-tokens", type=int, default=3000)
    p.add_argument("--interval", type=int, default=512)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--requests", type=int, default=1, help="requests whose steps are due together")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the eviction thread's core)")
    p.add_argument("--repeats", type=int, default=3, help="median of this many replays (after a warm-up)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    shape = model_shape(a.model)
    command = command_line("python -m benchmarks step-profile", argv)
    out_dir = a.out or results_dir("step-profile", time_stamp())
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, results = [], []
    for spec in a.policies:
        replay(spec, shape, a.prompt_tokens, a.interval, a.block_size, a.requests)  # warm-up
        runs = [
            replay(spec, shape, a.prompt_tokens, a.interval, a.block_size, a.requests)
            for _ in range(a.repeats)
        ]
        runs.sort(key=lambda run: run[1])
        timers, total, steps, kept = runs[len(runs) // 2]
        per_request = total / a.requests
        seconds = {ph: timers.seconds.get(ph, 0.0) / a.requests for ph in PHASES}
        results.append(
            {
                "policy": spec,
                "total_s_per_request": per_request,
                "steps": steps,
                "kept": kept,
                "phase_s": seconds,
            }
        )
        rows.append(
            [spec, f"{1e3 * per_request:.0f}", str(steps // a.requests)]
            + [f"{1e3 * seconds[ph]:.0f}" for ph in PHASES]
        )
    header = ["policy", "ms / request", "steps"] + [f"{ph} ms" for ph in PHASES]
    title = (
        f"eviction steps of one {a.prompt_tokens}-token prompt ({a.requests} due together), "
        f"{shape['layers']} layers, {shape['heads']}/{shape['kv_heads']} heads, head dim {shape['head_dim']}, "
        f"interval {a.interval}, block {a.block_size}, {a.threads} thread(s), median of {a.repeats}"
    )
    table = "\n".join([title, *markdown_table(header, rows), f"command: {command}"])
    print(table)
    (out_dir / "step_profile.json").write_text(
        json.dumps({"command": command, "shape": shape, "results": results}, indent=1)
    )
    (out_dir / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
