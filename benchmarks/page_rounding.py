"""What page granularity costs: token-level evictions each policy asks for vs what freeing
whole pages realises (``docs/design.md`` §2, "Paged eviction"), under each selection.

One server per selection configuration (``--configs``, default: page-level selection, and
token-level selection with the page rules ``all`` and ``majority``); each policy is selected
per request (``vllm_xargs``), on the same long prompt.

* Token-level selection: each (layer, head) keeps its own best tokens; a page is freed when
  the page rule says so (``all``: every entry evicted). "realised %" is the share of those
  token evictions that became free memory.
* Page-level selection (budget policies): the best whole pages within the budget are kept.
  "requested" is still what the policy's per-head token selection would evict, "realised"
  how many of those lie in freed pages: their gap is what the policies' heads disagree on.
  NAMM has no budget: it always uses token-level selection and the page rule.

``python -m benchmarks page-rounding [--model PATH] [--tokens 3200] [--budget 512] [--block-size 32]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.launch import CPU_DEFAULTS, VllmServer
from benchmarks.results import command_line
from evolve.tasks.synthetic import make_sample
from vllm_namm.config import EvictionConfig
from vllm_namm.policies.registry import needs_budget

POLICIES = ("streaming", "h2o", "snapkv", "l2", "namm")
DEFAULT_CONFIGS = ["page", "token:all", "token:majority"]


def parse_config(spec: str) -> tuple[str, str, str]:
    """``page[:SCORE]`` or ``token[:RULE]`` -> (selection, page score, page rule) flag values."""
    score = EvictionConfig.model_fields["page_score"].default
    selection, _, arg = spec.partition(":")
    if selection == "page" and arg in ("", "mean", "max", "vote"):
        return "page", arg or score, "all"
    if selection == "token" and arg in ("", "all", "majority", "any"):
        return "token", score, arg or "all"
    raise argparse.ArgumentTypeError(f"{spec!r}: expected page[:mean|max|vote] or token[:all|majority|any]")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local model (default: a tiny random Llama built here)")
    p.add_argument("--tokens", type=int, default=3200)
    p.add_argument("--budget", type=int, default=512, help="token budget of the fixed-budget policies")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=[parse_config(c) for c in DEFAULT_CONFIGS],
        metavar="CONFIG",
        help=f"page[:mean|max|vote] or token[:all|majority|any] (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    p.add_argument("--out", default=None, help="write the JSON rows here")
    a = p.parse_args(argv)
    model = a.model
    if model is None:
        from benchmarks.tiny_model import build_random_llama

        model = str(build_random_llama(Path(tempfile.mkdtemp()) / "tiny-llama"))
    prompt = make_sample("passkey", 10**9, a.tokens).prompt
    rows = []
    for selection, score, rule in a.configs:
        label = f"page ({score})" if selection == "page" else f"token, {rule}"
        flags = [
            "--block-size",
            str(a.block_size),
            "--max-model-len",
            str(a.tokens + 64),
            "--kv-eviction",
            "streaming",
            "--kv-eviction-budget",
            str(a.budget),
            "--kv-eviction-page-rule",
            rule,
            "--kv-eviction-selection",
            selection,
            "--kv-eviction-page-score",
            score,
        ]
        policies = [q for q in POLICIES if selection == "token" or needs_budget(q)]
        with VllmServer(model, flags, base_flags=CPU_DEFAULTS) as server:
            for policy in policies:
                xargs: dict = {"kv_eviction": policy}
                if needs_budget(policy):
                    xargs["kv_eviction_budget"] = a.budget
                r = server.client.completions.create(
                    model=model, prompt=prompt, max_tokens=4, temperature=0, extra_body={"vllm_xargs": xargs}
                )
                s = ((r.model_extra or {}).get("kv_transfer_params") or {}).get("namm") or {}
                req, real = s.get("token_evictions_requested", 0), s.get("token_evictions_realised", 0)
                rows.append(
                    {
                        "selection": label,
                        "policy": policy,
                        "requested": req,
                        "realised": real,
                        "realised_fraction": real / req if req else None,
                        "held_blocks": s.get("held_blocks"),
                        "logical_blocks": s.get("logical_blocks"),
                        "budget_blocks": s.get("budget_blocks"),
                        "retained_fraction": s.get("retained_fraction", 1.0),
                    }
                )
    print(
        f"prompt {a.tokens} tokens, block {a.block_size}, budget {a.budget} tokens "
        f"({-(-a.budget // a.block_size)} blocks)"
    )
    print(
        f"| {'selection':15} | {'policy':9} | {'requested':>9} | {'realised':>8} | {'realised %':>10} "
        f"| {'blocks held':>11} |"
    )
    print(f"|{'-' * 17}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 12}|{'-' * 13}|")
    for row in rows:
        frac = "-" if row["realised_fraction"] is None else f"{100 * row['realised_fraction']:.1f}"
        held = f"{row['held_blocks']}/{row['logical_blocks']}" if row["held_blocks"] is not None else "all"
        print(
            f"| {row['selection']:15} | {row['policy']:9} | {row['requested']:>9} | {row['realised']:>8} "
            f"| {frac:>10} | {held:>11} |"
        )
    print("command: " + command_line("python -m benchmarks page-rounding", argv))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
