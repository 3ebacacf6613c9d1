"""What eviction-aware prefix caching saves (issue 27, item 2): many questions over one shared
document, on one ``namm`` server with step snapshots and on the same server without them (the
correctness-only fix: an evicting request reads no prefix-cache hit and prefills its whole
prompt).

Each server gets the same requests one after another (greedy, prefix caching on, vLLM's
default); the prefill tokens are vLLM's own counter ``vllm:prompt_tokens_by_source`` with
``source="local_compute"`` (the prompt tokens actually computed, cache hits excluded). The
reference answers come from a third server with prefix caching off, where every request runs
as it would on a fresh server; every answer of the first two must equal its reference (text,
and each token's logprob within ``--tolerance``).

``python -m benchmarks prefix-snapshots [--model PATH] [--requests 32] [--doc-tokens 2000]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.launch import CPU_DEFAULTS, ROOT, VllmServer, metric_sum
from benchmarks.results import command_line
from evolve.tasks.synthetic import kv_question, score_answer, shared_document

TINY = ROOT / "benchmarks" / "models" / "namm-tiny-llama"
SERVERS: dict[str, list[str]] = {
    "snapshots": [],  # the default: eviction-aware prefix caching on
    "correctness-only": ["--kv-eviction-prefix-cache-mib", "0"],
    "fresh": ["--no-enable-prefix-caching"],
}


def computed_tokens(metrics: dict[str, float]) -> float:
    """Prompt tokens the engine prefilled (vLLM's ``local_compute`` source)."""
    return sum(
        v
        for k, v in metrics.items()
        if k.startswith("vllm:prompt_tokens_by_source_total{") and 'source="local_compute"' in k
    )


def run(server: VllmServer, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    before, t0 = server.metrics(), time.perf_counter()
    answers = []
    for prompt in prompts:
        out = server.client.completions.create(
            model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=1
        )
        choice = out.choices[0]
        answers.append({"text": choice.text, "logprobs": choice.logprobs.token_logprobs})
    wall, after = time.perf_counter() - t0, server.metrics()

    def delta(name: str) -> float:
        return metric_sum(after, name) - metric_sum(before, name)

    return {
        "prefill_tokens": computed_tokens(after) - computed_tokens(before),
        "prompt_tokens": delta("vllm:prompt_tokens_total"),
        "cached_tokens": delta("vllm:prompt_tokens_cached_total"),
        "snapshot_hits": delta("vllm_namm:prefix_snapshot_hits_total"),
        "snapshot_bytes": metric_sum(after, "vllm_namm:prefix_snapshot_bytes"),
        "wall_s": wall,
        "answers": answers,
    }


def same(a: dict[str, Any], b: dict[str, Any], tolerance: float) -> bool:
    return a["text"] == b["text"] and all(
        abs(x - y) <= tolerance for x, y in zip(a["logprobs"], b["logprobs"], strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=TINY, help="local model (default: the trained tiny Llama)")
    p.add_argument("--requests", type=int, default=32, help="questions over the document (one key each)")
    p.add_argument("--doc-tokens", type=int, default=2000, help="the shared document's length")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--tolerance", type=float, default=1e-4, help="logprob tolerance against the fresh answer")
    p.add_argument("--kv-space-gib", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    document, facts = shared_document(
        args.seed, args.doc_tokens, args.requests, lambda t: len(tokenizer(t).input_ids)
    )
    prompts = [document + "\n" + kv_question(key) for key, _ in facts]
    flags = ["--kv-eviction", "namm", "--block-size", str(args.block_size)]
    results: dict[str, Any] = {
        "command": command_line("python -m benchmarks prefix-snapshots", argv),
        "document_tokens": len(tokenizer(document).input_ids),
    }
    for name, extra in SERVERS.items():
        with VllmServer(
            args.model, [*flags, *extra], base_flags=CPU_DEFAULTS, kv_space_gib=args.kv_space_gib
        ) as s:
            results[name] = run(s, prompts, args.max_tokens)
    fresh = results["fresh"]["answers"]
    for name in ("snapshots", "correctness-only"):
        r = results[name]
        r["equal_to_fresh"] = sum(
            same(a, f, args.tolerance) for a, f in zip(r["answers"], fresh, strict=True)
        )
    results["correct"] = sum(
        score_answer(a["text"], v) == 1.0 for a, (_, v) in zip(fresh, facts, strict=True)
    )
    results["ratio"] = results["snapshots"]["prefill_tokens"] / results["correctness-only"]["prefill_tokens"]

    print(f"{args.requests} requests over a {results['document_tokens']}-token document ({args.model.name})")
    print(f"{'server':<18}{'prompt':>9}{'prefilled':>11}{'cached':>9}{'hits':>6}{'= fresh':>9}{'wall s':>8}")
    for name in SERVERS:
        r = results[name]
        eq = r.get("equal_to_fresh", "-")
        print(
            f"{name:<18}{r['prompt_tokens']:>9.0f}{r['prefill_tokens']:>11.0f}{r['cached_tokens']:>9.0f}"
            f"{r['snapshot_hits']:>6.0f}{eq!s:>9}{r['wall_s']:>8.1f}"
        )
    print(f"prefill ratio snapshots / correctness-only: {results['ratio']:.3f}")
    print(f"fresh answers correct: {results['correct']}/{args.requests}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))
    ok = all(results[n]["equal_to_fresh"] == args.requests for n in ("snapshots", "correctness-only"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
