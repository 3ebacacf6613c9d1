"""What page granularity costs: token-level evictions each policy asks for vs what freeing
whole pages realises (DESIGN.md §2, "Page rounding").

One server; each policy is selected per request (``vllm_xargs``), on the same long prompt.
A page is freed only when every layer and KV head evicts all its tokens (``--page-rule``,
default ``all``); the table shows, per policy, the fraction of its (layer, head, token)
evictions that became free memory, and the fraction of the request's blocks it still held.

``python -m benchmarks page-rounding [--model PATH] [--tokens 3200] [--budget 512] [--block-size 32]``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.results import command_line
from evolve.tasks.synthetic import make_sample
from vllm_namm.launch import CPU_DEFAULTS, VllmServer

POLICIES = ("streaming", "h2o", "snapkv", "l2", "namm")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local model (default: a tiny random Llama built here)")
    p.add_argument("--tokens", type=int, default=3200)
    p.add_argument("--budget", type=int, default=512, help="token budget of the fixed-budget policies")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--page-rule", default="all", choices=["all", "majority", "any"])
    p.add_argument("--out", default=None, help="write the JSON rows here")
    a = p.parse_args(argv)
    model = a.model
    if model is None:
        from benchmarks.tiny_model import build_random_llama

        model = str(build_random_llama(Path(tempfile.mkdtemp()) / "tiny-llama"))
    prompt = make_sample("passkey", 10**9, a.tokens).prompt
    flags = ["--block-size", str(a.block_size), "--max-model-len", str(a.tokens + 64), "--kv-eviction", "streaming",
             "--kv-eviction-budget", str(a.budget), "--kv-eviction-page-rule", a.page_rule]
    rows = []
    with VllmServer(model, flags, base_flags=CPU_DEFAULTS) as server:
        for policy in POLICIES:
            xargs: dict = {"kv_eviction": policy}
            if policy != "namm":
                xargs["kv_eviction_budget"] = a.budget
            r = server.client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                                 extra_body={"vllm_xargs": xargs})
            s = ((r.model_extra or {}).get("kv_transfer_params") or {}).get("namm") or {}
            req, real = s.get("token_evictions_requested", 0), s.get("token_evictions_realised", 0)
            rows.append({"policy": policy, "requested": req, "realised": real,
                         "realised_fraction": real / req if req else None,
                         "held_blocks": s.get("held_blocks"), "logical_blocks": s.get("logical_blocks"),
                         "retained_fraction": s.get("retained_fraction", 1.0)})
    print(f"prompt {a.tokens} tokens, block {a.block_size}, budget {a.budget} tokens, page rule {a.page_rule}")
    print(f"{'policy':10} {'requested':>10} {'realised':>9} {'realised %':>10} {'blocks held':>12}")
    for row in rows:
        frac = "-" if row["realised_fraction"] is None else f"{100 * row['realised_fraction']:.1f}"
        held = f"{row['held_blocks']}/{row['logical_blocks']}" if row["held_blocks"] is not None else "all"
        print(f"{row['policy']:10} {row['requested']:>10} {row['realised']:>9} {frac:>10} {held:>12}")
    print("command: " + command_line("python -m benchmarks page-rounding", argv))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
