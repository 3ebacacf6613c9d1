"""One eviction step against the model's own forward over the same 512-token chunk, at real shapes.

Why: a tiny test model makes NAMM look expensive (its forward is nearly free) and hides the
n^2 terms that dominate at long context. This benchmark builds a random model with
Llama-3-8B *per-layer* shapes (hidden 4096, 32 query heads, 8 KV heads, head dim 128, MLP
14336) but only ``--layers`` layers, fills a KV cache of ``--cached`` tokens, and times, side by
side in one process with the same threads:

* the model's forward over one 512-token chunk on top of that cache (HF Llama, SDPA attention);
* one eviction step over the same cache for each policy and scorer variant, through the
  engine's own code (:func:`vllm_namm.request_memory.compute_steps` over a paged cache).

It prints each step's time, its ratio to the forward, and the FLOP / byte model of both (per
layer, and for a whole 32-layer 8B model). On a machine with CUDA the same command measures the
GPU (Triton kernels, ``--device cuda``).

``python -m benchmarks overhead [--cached 4096 8192 16384] [--layers 2] [--variants ...]``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.results import command_line, results_dir, time_stamp

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 4096, 32, 8, 128, 14336
CHUNK = 512
BLOCK = 16
FULL_LAYERS = 32
VARIANTS = [
    "namm-hand",
    "namm-bam",
    "namm-bam-w32",
    "namm-bam-w128",
    "namm-mlp",
    "h2o",
    "snapkv",
    "l2",
    "streaming",
]


@dataclass
class Cost:
    flop: float
    bytes: float


def forward_cost(n: int, c: int = CHUNK) -> Cost:
    """One decoder layer over ``c`` new tokens with ``n`` cached (GEMMs + attention)."""
    proj = 2 * c * HIDDEN * (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM + HEADS * HEAD_DIM)
    mlp = 2 * c * 3 * HIDDEN * MLP
    attn = 2 * 2 * c * HEADS * HEAD_DIM * (n + c / 2)
    weights = 4 * (HIDDEN * HEADS * HEAD_DIM * 2 + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * MLP)
    kv = 2 * 2 * (n + c) * KV_HEADS * HEAD_DIM  # bf16 K and V read once
    return Cost(proj + mlp + attn, weights + kv)


def step_cost(variant: str, n: int, q: int = CHUNK, window: int | None = None) -> Cost:
    """One eviction step of one layer over ``n`` cached tokens and ``q`` queries."""
    cols = Cost(
        2 * q * HEADS * HEAD_DIM * n + 5 * q * HEADS * n, 2 * n * KV_HEADS * HEAD_DIM + 4 * KV_HEADS * q * n
    )
    if variant in ("l2", "streaming"):
        return (
            Cost(2 * n * KV_HEADS * HEAD_DIM, 2 * n * KV_HEADS * HEAD_DIM)
            if variant == "l2"
            else Cost(n, 8 * n)
        )
    if variant in ("h2o", "snapkv"):
        return cols
    frames = q // 16
    stft = Cost(2 * 34 * 32 * frames * KV_HEADS * n, 4 * KV_HEADS * q * n)
    rows = KV_HEADS * n
    proj = 2 * rows * (25 * 96 + 32 * 50 + 25)
    if variant == "namm-mlp":
        scorer = Cost(2 * rows * (25 * 25 * 2 + 25), 4 * rows * 25 * 2)
    elif variant == "namm-hand":  # zero value projection: no attention
        scorer = Cost(proj, 4 * rows * 25 * 2)
    else:
        span = n / 2 if window is None else min(window + 1, n)
        scorer = Cost(proj + 2 * 2 * 32 * rows * span, 4 * rows * (25 * 2 + 96))
    return Cost(cols.flop + stft.flop + scorer.flop, cols.bytes + stft.bytes + scorer.bytes)


def build_model(layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=65536,
        rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def time_it(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_forward(model, n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    from transformers import DynamicCache

    layers = model.config.num_hidden_layers
    g = torch.Generator(device="cpu").manual_seed(1)
    kv = [
        (
            torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype),
            torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=g).to(device, dtype),
        )
        for _ in range(layers)
    ]
    ids = torch.randint(0, 256, (1, CHUNK), generator=g).to(device)
    pos = torch.arange(n, n + CHUNK, device=device).view(1, -1)

    def run():
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        with torch.no_grad():
            model(
                input_ids=ids, position_ids=pos, cache_position=pos[0], past_key_values=cache, use_cache=True
            )

    return time_it(run, repeats)


def variant_config(variant: str, tmp: Path):
    from benchmarks.weights_files import resolve
    from vllm_namm.config import EvictionConfig

    if not variant.startswith("namm"):
        budget = None if variant == "none" else {"ratio": 0.25}
        return EvictionConfig(policy=variant, budget=budget, page_rule="majority")
    if variant == "namm-hand":
        return EvictionConfig(policy="namm", weights="hand")
    path = resolve("random:" + variant.removeprefix("namm-"), tmp)  # random, non-zero weights
    return EvictionConfig(policy="namm", weights=path, page_rule="majority")


def time_step(
    variant: str, n: int, layers: int, device: torch.device, dtype: torch.dtype, repeats: int, tmp: Path
) -> float:
    """One eviction step of one request over ``n`` cached tokens (all layers), as the engine runs it."""
    from vllm_namm import kernels
    from vllm_namm.policies import make_policy
    from vllm_namm.request_memory import PagedCacheReader, RequestMemory, begin_step, compute_steps

    cfg = variant_config(variant, tmp)
    policy = make_policy(cfg)
    g = torch.Generator(device="cpu").manual_seed(2)
    n_blocks = -(-(n + CHUNK) // BLOCK)
    caches = []
    for _ in range(layers):
        cache = torch.randn(n_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, generator=g).to(device, dtype)
        caches.append((cache, kernels.PagedKeyLayout.flash(cache)))
    queries = [torch.randn(n + CHUNK, HEADS, HEAD_DIM, generator=g).to(device, dtype) for _ in range(layers)]
    fused = device.type == "cuda"

    def run():
        # every cached token is "new" to a fresh state: the same work as a state carried from earlier steps
        mem = RequestMemory(policy, layers, BLOCK, num_tokens=n)
        mem.add_queries([q[n:] for q in queries], n)
        reader = PagedCacheReader(caches, torch.arange(n_blocks), HEAD_DIM**-0.5, fused=fused)
        compute_steps([begin_step(mem, reader)], cfg, HEAD_DIM**-0.5, KV_HEADS, device)

    return time_it(run, repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--cached", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, help="model/cache dtype (default bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = (
        getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    stamp = time_stamp()
    out_dir = a.out or results_dir("overhead", stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command_line("python -m benchmarks overhead", argv)
    from tqdm import tqdm

    model = build_model(a.layers, device, dtype)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    bar = tqdm(total=len(a.cached) * (1 + len(a.variants)), desc="overhead", unit="run")
    for n in a.cached:
        fwd = time_forward(model, n, device, dtype, a.repeats)
        bar.update(1)
        fc = forward_cost(n)
        for v in a.variants:
            t = time_step(v, n, a.layers, device, dtype, a.repeats, out_dir)
            bar.update(1)
            window = int(v.removeprefix("namm-bam-w")) if v.startswith("namm-bam-w") else None
            sc = step_cost(v, n, window=window)
            rows.append(
                {
                    "cached": n,
                    "variant": v,
                    "step_s": t,
                    "forward_s": fwd,
                    "ratio": t / fwd,
                    "model_flop_ratio": sc.flop / fc.flop,
                    "step_gflop_per_layer": sc.flop / 1e9,
                    "step_mbytes_per_layer": sc.bytes / 1e6,
                    "forward_gflop_per_layer": fc.flop / 1e9,
                    "step_gflop_8b": sc.flop * FULL_LAYERS / 1e9,
                }
            )
    bar.close()
    print(
        f"one eviction step vs the forward over a {CHUNK}-token chunk; {a.layers} layers of Llama-3-8B shapes, "
        f"{dtype}, {where}"
    )
    print(
        f"{'cached':>7} {'variant':<14} {'step ms':>9} {'fwd ms':>9} {'measured':>9} {'FLOP model':>10} "
        f"{'step GFLOP/layer':>16} {'step MB/layer':>13} {'8B step TFLOP':>13}"
    )
    for r in rows:
        print(
            f"{r['cached']:>7} {r['variant']:<14} {1e3 * r['step_s']:>9.1f} {1e3 * r['forward_s']:>9.1f} "
            f"{r['ratio']:>8.1%} {r['model_flop_ratio']:>9.1%} {r['step_gflop_per_layer']:>16.2f} "
            f"{r['step_mbytes_per_layer']:>13.1f} {r['step_gflop_8b'] / 1e3:>13.3f}"
        )
    print("forward GFLOP per layer: " + ", ".join(f"{n}: {forward_cost(n).flop / 1e9:.0f}" for n in a.cached))
    print(f"command: {command}")
    (out_dir / "overhead.json").write_text(
        json.dumps(
            {"command": command, "device": where, "dtype": str(dtype), "layers": a.layers, "rows": rows},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
