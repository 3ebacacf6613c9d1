"""Wall time of one evolution generation vs the same requests with ``kv_eviction=none``.

The goal (evolve issue): a generation — population x samples requests, each carrying its
candidate's whole parameter vector — should take at most 1.25x the time of sending the
same prompts with eviction off to the same server. Both batches run back to back on one
``vllm serve --kv-eviction namm`` server started here with the flags evolution serves with
(``--no-enable-prefix-caching --kv-eviction-lag 0``: a prefix-cache hit would hand the
``none`` batch its prompts for free and give NAMM no queries to score), with evolve's own
client and task sampler, so the ratio measures exactly what evolution adds: parameter
transfer, scoring, and eviction.

``python -m benchmarks evolve-overhead [--model PATH] [--popsize 8] [--samples 4] [--tokens 4000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np


async def _batch(client, samples, xargs_list) -> tuple[float, float, float]:
    """Send every (sample, xargs) at once; (seconds, mean retained fraction, mean eviction steps)."""
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *[client.complete(s.prompt, s.max_tokens, xa) for xa in xargs_list for s in samples]
    )
    elapsed = time.perf_counter() - t0
    steps = float(np.mean([r.eviction_steps or 0 for r in results]))
    return elapsed, float(np.mean([r.retained_fraction for r in results])), steps


async def _measure(
    base_url: str, popsize: int, n_samples: int, tokens: int, sigma: float, seed: int, repeats: int
) -> dict:
    from evolve.client import EvalClient
    from evolve.config import ExtraParamsConfig, ServerConfig, TaskConfig
    from evolve.params import ParamSpace
    from evolve.samples import TaskPool
    from vllm_namm.policies import DEFAULT_WEIGHTS

    space = ParamSpace.from_file(DEFAULT_WEIGHTS, ExtraParamsConfig())
    rng = np.random.default_rng(seed)
    x0 = space.x0()
    population = [x0 + sigma * rng.standard_normal(space.dim) for _ in range(popsize)]
    pool = TaskPool(TaskConfig(kind="passkey", target_tokens=[tokens], max_tokens=8))
    samples = pool.draw(n_samples, rng)
    candidates = [space.xargs(x) for x in population]
    baseline = [{"kv_eviction": "none"}] * popsize
    rows = []
    async with EvalClient(ServerConfig(base_url=base_url, max_concurrency=popsize * n_samples)) as client:
        await client.check()
        await _batch(client, samples, baseline[:1])  # warm-up
        for _ in range(repeats):
            t_none, _, _ = await _batch(client, samples, baseline)
            t_namm, kept, steps = await _batch(client, samples, candidates)
            rows.append(
                {
                    "none_s": t_none,
                    "namm_s": t_namm,
                    "ratio": t_namm / t_none,
                    "retained_fraction": kept,
                    "eviction_steps": steps,
                }
            )
    return {
        "popsize": popsize,
        "samples": n_samples,
        "tokens": tokens,
        "sigma": sigma,
        "runs": rows,
        "median_ratio": float(np.median([r["ratio"] for r in rows])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local model (default: a tiny random Llama built here)")
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4000, help="prompt length (evolution runs at 4k)")
    p.add_argument("--sigma", type=float, default=0.065)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="write the JSON result here")
    a = p.parse_args(argv)

    from benchmarks.launch import CPU_DEFAULTS, VllmServer
    from benchmarks.results import command_line

    model = a.model
    if model is None:
        from benchmarks.tiny_model import build_random_llama

        model = str(build_random_llama(Path(tempfile.mkdtemp()) / "tiny-llama"))
    args = [
        *CPU_DEFAULTS,
        "--block-size",
        "32",
        "--max-model-len",
        str(a.tokens + 256),
        "--no-enable-prefix-caching",
        "--kv-eviction-lag",
        "0",
        "--kv-eviction",
        "namm",
    ]
    with VllmServer(model, args) as server:
        result = asyncio.run(
            _measure(server.base_url, a.popsize, a.samples, a.tokens, a.sigma, a.seed, a.repeats)
        )
    result["command"] = command_line("python -m benchmarks evolve-overhead", argv)
    print(f"{'run':>3} {'none s':>8} {'namm s':>8} {'ratio':>6} {'kept':>5} {'steps':>5}")
    for i, r in enumerate(result["runs"]):
        print(
            f"{i:3d} {r['none_s']:8.2f} {r['namm_s']:8.2f} {r['ratio']:6.2f} "
            f"{r['retained_fraction']:5.2f} {r['eviction_steps']:5.1f}"
        )
    print(f"median generation time / none: {result['median_ratio']:.2f}  (goal <= 2)")
    print(f"command: {result['command']}")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
