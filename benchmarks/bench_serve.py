"""vLLM's own ``vllm bench serve`` against one server per eviction mode, side by side with ``none``.

Why: this is how users judge a serving plugin. Every mode gets the same model, the same
workload (vLLM's random dataset, fixed seed) and the same flags; only the eviction flags
differ. The table shows each mode's output throughput, TTFT and TPOT and their ratio to
``--kv-eviction none`` measured in the same run.

Default workload (the serving-speed issue): a tiny random 4-layer Llama (hidden 128, 4 heads,
2 KV heads, character tokenizer), ``--random-input-len 3000 --random-output-len 256
--num-prompts 32 --ignore-eos --seed 1``.

``python -m benchmarks bench-serve --modes none namm h2o:ratio=0.25 snapkv:ratio=0.25 streaming:ratio=0.25
namm:weights=random:mlp``  (``random:KIND``: a scorer of that kind with random non-zero weights)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.launch import CPU_DEFAULTS, VllmServer, metric_label, vllm_bin
from benchmarks.results import command_line, markdown_table, results_dir, time_stamp
from benchmarks.serving import Mode
from benchmarks.weights_files import resolve

DEFAULT_MODES = [
    "none",
    "namm",
    "namm:weights=random:mlp",
    "h2o:ratio=0.25",
    "snapkv:ratio=0.25",
    "streaming:ratio=0.25",
]
FIELDS = [
    ("output tok/s", "output_throughput", "{:.1f}"),
    ("mean TTFT (ms)", "mean_ttft_ms", "{:.0f}"),
    ("mean TPOT (ms)", "mean_tpot_ms", "{:.1f}"),
    ("duration (s)", "duration", "{:.1f}"),
    ("completed", "completed", "{:d}"),
]


def build_default_model(path: Path) -> Path:
    from benchmarks.tiny_model import build_random_llama

    if not (path / "config.json").exists():
        build_random_llama(path, layers=4, hidden=128, heads=4, kv_heads=2, seed=0)
    return path


def run_mode(mode: Mode, model: Path, a: argparse.Namespace, out_dir: Path) -> dict:
    flags = mode.server_flags()
    if "--namm-weights" in flags:
        i = flags.index("--namm-weights") + 1
        flags[i] = resolve(flags[i], out_dir)
    safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", mode.spec)
    block = [] if a.block_size == "default" or "block" in mode.options else ["--block-size", a.block_size]
    base = [*CPU_DEFAULTS, "--max-model-len", str(a.max_model_len), *block, "--seed", "0"]
    with VllmServer(
        model,
        flags,
        base_flags=base,
        log_path=out_dir / f"server-{safe}.log",
        kv_space_gib=a.kv_space_gib,
        timeout_s=600,
    ) as server:
        cmd = [
            vllm_bin(),
            "bench",
            "serve",
            "--backend",
            "openai",
            "--base-url",
            server.url,
            "--model",
            server.model,
            "--tokenizer",
            str(model),
            "--dataset-name",
            "random",
            "--random-input-len",
            str(a.input_len),
            "--random-output-len",
            str(a.output_len),
            "--num-prompts",
            str(a.num_prompts),
            "--seed",
            str(a.seed),
            "--ignore-eos",
            "--save-result",
            "--result-dir",
            str(out_dir),
            "--result-filename",
            f"bench-{safe}.json",
        ]
        print(f"[{mode.spec}] $ {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out_dir / f"bench-{safe}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed for mode {mode.spec}:\n{proc.stderr[-3000:]}")
        held = server.metrics()
    result = json.loads((out_dir / f"bench-{safe}.json").read_text())
    result["mode"] = mode.spec
    result["server_flags"] = flags
    result["evicted_blocks"] = held.get("vllm_namm:evicted_blocks_total", 0.0)
    result["block_size"] = metric_label(held, "vllm:cache_config_info", "block_size")
    return result


def format_table(results: list[dict], base: dict | None) -> str:
    """One row per metric, one column per mode; each cell's ratio is to ``base`` (no ratio without one)."""
    header = ["metric"] + [r["mode"] for r in results]
    rows = []
    for label, key, fmt in FIELDS:
        row = [label]
        for r in results:
            v = r.get(key)
            cell = "-" if v is None else fmt.format(v)
            if base is not None and r is not base and v and base.get(key):
                cell += f" ({v / base[key]:.2f}x)"
            row.append(cell)
        rows.append(row)
    rows.append(["evicted blocks"] + [f"{r['evicted_blocks']:.0f}" for r in results])
    rows.append(["block size"] + [str(r.get("block_size") or "?") for r in results])
    return "\n".join(markdown_table(header, rows))


def format_tables(results: list[dict]) -> str:
    """A table per ``none`` run in ``results`` (e.g. ``none`` and ``none:block=32``), ratios to that run.

    Why: eviction runs at the backend's smallest block while ``none`` keeps vLLM's own; ratios to
    each baseline separate the eviction step's price from the block size's.
    """
    bases = [r for r in results if r["mode"].partition(":")[0] == "none"] or [None]
    parts = []
    for base in bases:
        title = (
            "no `none` run: no ratios"
            if base is None
            else (f"ratios to `{base['mode']}` (block {base.get('block_size') or '?'})")
        )
        parts.append(f"{title}\n\n{format_table(results, base)}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks bench-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="default: a tiny random 4-layer Llama built here")
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, help="POLICY[:key=value,...] per server")
    p.add_argument("--input-len", type=int, default=3000)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument(
        "--block-size",
        default="32",
        type=lambda v: v if v == "default" else str(int(v)),
        help="N for every server, or 'default': each server's own (vLLM's 128 on CPU for none, "
        "the plugin's smallest block with eviction); a mode's block=N wins",
    )
    p.add_argument("--kv-space-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    modes = [Mode.parse(m) for m in a.modes]
    stamp = time_stamp()
    out_dir = a.out or results_dir("bench-serve", stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = a.model or build_default_model(Path(tempfile.mkdtemp()) / "tiny-llama-4l")
    command = command_line("python -m benchmarks bench-serve", argv)
    results = []
    for mode in modes:
        results.append(run_mode(mode, model, a, out_dir))
        (out_dir / "bench_serve.json").write_text(
            json.dumps({"command": command, "results": results}, indent=1)
        )
    table = format_tables(results)
    print(
        f"vllm bench serve, random dataset {a.input_len} in / {a.output_len} out x {a.num_prompts} prompts, "
        f"seed {a.seed}; model {model}"
    )
    print(table)
    print(f"command: {command}")
    (out_dir / "table.md").write_text(table + f"\n\ncommand: {command}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
