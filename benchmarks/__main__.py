"""``python -m benchmarks COMMAND ...``: one entry point for every benchmark of vllm-namm, and the demo.

Why a dispatcher: the README and the design spec name one command; each sub-command lives in
its own module and is imported only when chosen (vLLM and torch imports are slow).
"""

from __future__ import annotations

import importlib
import sys

from evolve.extras import require

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "benchmarks.demo",
        "the plugin end to end: one long prompt with and without eviction, answers and KV blocks",
    ),
    "bench-serve": (
        "benchmarks.bench_serve",
        "vLLM's own `vllm bench serve` per eviction mode, side by side with none",
    ),
    "serving": (
        "benchmarks.serving",
        "throughput, KV blocks in use, concurrency, TTFT/TPOT per eviction mode vs none",
    ),
    "quality": ("benchmarks.quality", "accuracy of full cache vs eviction policies at 25 % / 50 % cache"),
    "kernels": ("benchmarks.kernels_bench", "Triton kernels vs their torch references (GPU)"),
    "train-model": (
        "benchmarks.train_model",
        "train the small long-context Llama used by the quality benchmark",
    ),
    "page-rounding": (
        "benchmarks.page_rounding",
        "token evictions each policy asks for vs what freed pages realise",
    ),
    "evolve-overhead": (
        "benchmarks.evolve_overhead",
        "one evolution generation vs the same requests without eviction",
    ),
    "prefix-snapshots": (
        "benchmarks.prefix_snapshots",
        "prefill saved by eviction-aware prefix caching: questions over one shared document",
    ),
    "overhead": (
        "benchmarks.overhead",
        "one eviction step vs the model's forward over the same chunk, 8B layer shapes",
    ),
    "step-profile": (
        "benchmarks.step_profile",
        "where a prompt's eviction steps spend their time, by phase, at a real model's shapes",
    ),
}

NO_EXTRA = frozenset({"demo"})
"""Commands that run on the plugin's own dependencies (the demo: vLLM brings the OpenAI client)."""


def usage() -> str:
    lines = ["usage: python -m benchmarks COMMAND [--help] [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if name not in NO_EXTRA:
        require("bench", f"python -m benchmarks {name}")
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "main", None)
    if entry is None:
        print(
            f"{COMMANDS[name][0]} has no main(); run `python -m {COMMANDS[name][0]}` instead", file=sys.stderr
        )
        return 2
    sys.argv = [f"python -m benchmarks {name}", *rest]
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
