"""``python -m benchmarks demo``: the plugin end to end on a small local model.

Starts ``vllm serve MODEL --kv-eviction namm``, sends one long passkey prompt twice —
with NAMM, and with ``kv_eviction=none`` for that request (vLLM's own behaviour) — and
prints both answers beside the KV blocks each used (peak while running, sampled from
vLLM's ``vllm:kv_cache_usage_perc``, and held at the end).

Default model: our own trained ``benchmarks/models/namm-tiny-llama`` when present, else a
tiny random Llama built on the spot (its answers are then noise, but the memory figures
are real).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.launch import CPU_DEFAULTS, VllmServer
from evolve.tasks.synthetic import make_sample, score_answer

TRAINED = Path(__file__).resolve().parent / "models" / "namm-tiny-llama"


def _peak_blocks(server: VllmServer, total_blocks: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        usage = server.metric("vllm:kv_cache_usage_perc") or 0.0
        out.append(usage * total_blocks)
        time.sleep(0.05)


def run(model: str | None, tokens: int, policy_args: list[str], block_size: int) -> None:

    if model is None:
        if (TRAINED / "config.json").exists():
            model = str(TRAINED)
        else:
            from benchmarks.tiny_model import build_random_llama

            model = str(build_random_llama(Path(tempfile.mkdtemp()) / "tiny-llama"))
            print(f"(no trained model at {TRAINED}; using a random tiny Llama: answers are noise)")
    sample = make_sample("passkey", 10**9 + 7, tokens)
    args = [
        *CPU_DEFAULTS,
        "--block-size",
        str(block_size),
        "--max-model-len",
        str(tokens + 256),
        *policy_args,
    ]
    print(f"starting: vllm serve {model} {' '.join(args)}")
    with VllmServer(model, args) as server:
        total = server.num_blocks()
        client = server.client
        rows = []
        for label, xargs in (("namm", {}), ("none", {"kv_eviction": "none"})):
            samples: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=_peak_blocks, args=(server, total, stop, samples), daemon=True)
            sampler.start()
            t0 = time.monotonic()
            resp = client.completions.create(
                model=model,
                prompt=sample.prompt,
                max_tokens=12,
                temperature=0,
                extra_body={"vllm_xargs": xargs} if xargs else None,
            )
            elapsed = time.monotonic() - t0
            stop.set()
            sampler.join()
            stats = (resp.model_extra or {}).get("kv_transfer_params") or {}
            stats = stats.get("namm", {})
            answer = resp.choices[0].text.strip()
            logical = -(-(resp.usage.prompt_tokens + resp.usage.completion_tokens - 1) // block_size)
            held = stats.get("held_blocks", logical)
            rows.append(
                (
                    label,
                    answer,
                    score_answer(answer, sample.answer),
                    max([*samples, held]),
                    held,
                    logical,
                    elapsed,
                )
            )
    print(f"\npasskey prompt: {resp.usage.prompt_tokens} tokens, expected answer {sample.answer}")
    print(
        f"{'mode':6} {'answer':14} {'correct':7} {'peak KV blocks':>14} {'held at end':>11} {'of':>4} {'seconds':>7}"
    )
    for label, answer, ok, peak, held, logical, secs in rows:
        print(f"{label:6} {answer[:14]!r:14} {bool(ok)!s:7} {peak:14.0f} {held:11d} {logical:4d} {secs:7.1f}")
    (_, _, namm_ok, namm_peak, namm_held, _, _), (_, _, none_ok, none_peak, none_held, _, _) = rows
    print(
        f"\nnamm held {namm_held} KV blocks at the end against {none_held} without eviction: "
        f"{100 * (1 - namm_held / max(1, none_held)):.0f} % saved (peak {namm_peak:.0f} vs {none_peak:.0f}: "
        f"{100 * (1 - namm_peak / max(1, none_peak)):.0f} % saved); "
        f"answer {'as correct as' if namm_ok == none_ok else 'different from'} the full cache's"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="local model path (default: our trained tiny Llama)")
    p.add_argument("--tokens", type=int, default=3000, help="prompt length in tokens")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument(
        "--namm-weights",
        default=None,
        help="weights file or shipped name (default: 'evolved', the evolved weights for our tiny Llama)",
    )
    a = p.parse_args(argv)
    policy = ["--kv-eviction", "namm"] + (["--namm-weights", a.namm_weights] if a.namm_weights else [])
    run(a.model, a.tokens, policy, a.block_size)


if __name__ == "__main__":
    main()
