"""``python -m benchmarks demo``: the plugin end to end on a real model.

Starts ``vllm serve MODEL --kv-eviction namm`` (default: SmolLM2-135M-Instruct, fetched by the
install script), asks one question about a ~3.5k-token passage of Paul Graham essays that has a
fact hidden in it, twice: with NAMM, and with ``kv_eviction=none`` for that request (vLLM's own
behaviour). Prints both answers beside the KV blocks each held (peak while running, sampled from
vLLM's ``vllm:kv_cache_usage_perc``, and held at the end) and the saving.

``--model`` with a folder that has no chat template (e.g. our tiny Llama) asks a synthetic
passkey question instead.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.launch import CPU_DEFAULTS, VllmServer

DEMO_SEED = 10**9 + 7
"""A held-out seed (never used in evolution)."""


def _peak_blocks(server: VllmServer, total_blocks: int, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        usage = server.metric("vllm:kv_cache_usage_perc") or 0.0
        out.append(usage * total_blocks)
        time.sleep(0.05)


def demo_question(model: str, tokens: int) -> tuple[str, str, int, Any]:
    """(prompt, expected answer, max tokens, scorer): a real-text needle when the model has a chat
    template, else a synthetic passkey."""
    from evolve.tasks import realtext

    try:
        tokenizer = realtext.load_tokenizer(model)
    except (ValueError, OSError):
        from evolve.tasks.synthetic import make_sample, score_answer

        s = make_sample("passkey", DEMO_SEED, tokens)
        return s.prompt, s.answer, 12, lambda text: score_answer(text, s.answer)
    s = realtext.make_sample("niah_number", DEMO_SEED, tokens, tokenizer, depth=0.4)
    return s.prompt, s.answer, s.max_tokens, lambda text: realtext.score_answer(text, s)


def run(model: str, tokens: int, policy_args: list[str], block_size: int | None) -> int:
    prompt, expected, max_tokens, score = demo_question(model, tokens)
    args = [
        *CPU_DEFAULTS,
        *(["--block-size", str(block_size)] if block_size else []),
        "--max-model-len",
        str(tokens + 256),
        *policy_args,
    ]
    print(f"starting: vllm serve {model} {' '.join(args)}", flush=True)
    with VllmServer(model, args) as server:
        total = server.num_blocks()
        block = server.block_size()
        rows = []
        for label, xargs in (("namm", {}), ("none", {"kv_eviction": "none"})):
            samples: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=_peak_blocks, args=(server, total, stop, samples), daemon=True)
            sampler.start()
            t0 = time.monotonic()
            resp = server.client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"vllm_xargs": xargs} if xargs else None,
            )
            elapsed = time.monotonic() - t0
            stop.set()
            sampler.join()
            stats = ((resp.model_extra or {}).get("kv_transfer_params") or {}).get("namm", {})
            answer = resp.choices[0].text.strip()
            logical = -(-(resp.usage.prompt_tokens + resp.usage.completion_tokens - 1) // block)
            held = stats.get("held_blocks", logical)
            rows.append((label, answer, score(answer) == 1.0, max([*samples, held]), held, logical, elapsed))
    print(f"\nquestion about a {resp.usage.prompt_tokens}-token passage; expected answer {expected}")
    print(
        f"{'mode':6} {'answer':24} {'correct':7} {'peak KV blocks':>14} {'held at end':>11} {'of':>4} {'seconds':>7}"
    )
    for label, answer, ok, peak, held, logical, secs in rows:
        print(f"{label:6} {answer[:24]!r:24} {ok!s:7} {peak:14.0f} {held:11d} {logical:4d} {secs:7.1f}")
    (_, _, namm_ok, namm_peak, namm_held, _, _), (_, _, none_ok, none_peak, none_held, _, _) = rows
    print(
        f"\nnamm held {namm_held} KV blocks at the end against {none_held} without eviction: "
        f"{100 * (1 - namm_held / max(1, none_held)):.0f} % saved (peak {namm_peak:.0f} vs {none_peak:.0f}: "
        f"{100 * (1 - namm_peak / max(1, none_peak)):.0f} % saved); "
        f"namm's answer is {'right' if namm_ok else 'wrong'}, the full cache's {'right' if none_ok else 'wrong'}"
    )
    return 0 if namm_ok else 1


def main(argv: list[str] | None = None) -> int:
    from evolve.assets import SMOLLM2_DIR, AssetError, check_model_dir

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=str(SMOLLM2_DIR), help="local model folder (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=3500, help="prompt length in the model's tokens")
    p.add_argument("--block-size", type=int, default=None, help="default: the plugin's choice for eviction")
    p.add_argument(
        "--namm-weights",
        default=None,
        help="weights file or shipped name (default: the plugin's choice, the shipped weights made for the "
        "served model, e.g. SmolLM2's, else its default)",
    )
    a = p.parse_args(argv)
    try:
        check_model_dir(a.model)
    except AssetError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    policy = ["--kv-eviction", "namm"] + (["--namm-weights", a.namm_weights] if a.namm_weights else [])
    return run(str(Path(a.model)), a.tokens, policy, a.block_size)


if __name__ == "__main__":
    sys.exit(main())
