"""Cost of NAMM's feature pipeline for one n_up chunk, per layer, on GPU.

``python -m benchmarks.kernels_bench [--lengths 4096,...] [--out runs/kernels_bench]``

For each cached length it times (``triton.testing.do_bench``, median):
  * fused       – ``paged_spectrogram_ema_triton``: paged q/k -> EMA features, no attention matrix;
  * two-step    – Triton columns [kv, n_q, n] written to memory, then the Triton spectrogram/EMA;
  * torch       – the plain torch reference (skipped where its fp32 [heads, n_q, n] scores
                  would not fit comfortably);
  * chunk SDPA  – the chunk's own attention (torch SDPA, GQA, same q and paged-out k/v),
                  the work the model does anyway, as the yardstick.
and the fused path's achieved bandwidth (keys read by both passes + q + EMA state/pad
read and written). Llama-3-8B shapes: 32 q heads, 8 kv heads, head dim 128, bf16.
Writes ``results.json`` and ``kernels_bench.png`` under ``--out``. Needs CUDA: it exits
with a message otherwise rather than report interpreter timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_LENGTHS = "4096,8192,16384,32768,65536,131072"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels_bench", description=__doc__.split("\n")[0])
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated cached lengths (tokens)")
    p.add_argument("--n-up", type=int, default=512)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--torch-ref-max-gb", type=float, default=16.0, help="skip the torch reference above this")
    p.add_argument("--out", default="runs/kernels_bench")
    return p.parse_args(argv)


def build(n_live: int, a: argparse.Namespace, dtype: torch.dtype, device: str = "cuda"):
    """A cache with 25 % holes and shuffled physical blocks; q = the chunk's newest n_up tokens."""
    import namm_kernels as nk

    bs = a.block_size
    n_blocks = -(-n_live // bs)
    pool = n_blocks + n_blocks // 4 + 1
    g = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(pool, a.kv_heads, bs, 2 * a.head_dim, device=device, dtype=dtype, generator=g)
    table = torch.randperm(pool, device=device, generator=g)[:n_blocks].to(torch.int32)
    positions = torch.arange(n_live, device=device) * 5 // 4  # evicted tokens leave position gaps
    q = torch.randn(a.n_up, a.q_heads, a.head_dim, device=device, dtype=dtype, generator=g)
    req = dict(
        q=q,
        key_cache=kv,
        layout=nk.PagedKeyLayout.flash(kv),
        block_table=table,
        positions=positions,
        query_positions=positions[-a.n_up :].clone(),
        scale=a.head_dim**-0.5,
    )
    state = dict(
        prev_pad=torch.rand(a.kv_heads, n_live, 16, device=device),
        prev_state=torch.rand(a.kv_heads, n_live, 17, device=device),
        first_frame=nk.first_valid_frame(positions, req["query_positions"]),
    )
    return req, state


def bench_length(n_live: int, a: argparse.Namespace, dtype: torch.dtype) -> dict:
    import namm_kernels as nk
    from triton.testing import do_bench

    req, st = build(n_live, a, dtype)
    row: dict = {"n_live": n_live}
    fused = lambda: nk.paged_spectrogram_ema_triton(**req, **st)  # noqa: E731

    def two_step():
        cols = nk.attention_columns_paged_triton(**req)
        return nk.spectrogram_ema_triton(cols, **st)

    row["fused_ms"] = do_bench(fused, return_mode="median")
    row["two_step_ms"] = do_bench(two_step, return_mode="median")
    ref_gb = 3 * a.q_heads * a.n_up * n_live * 4 / 1e9  # scores, probs, mask temporaries
    if ref_gb <= a.torch_ref_max_gb:
        row["torch_ms"] = do_bench(lambda: nk.paged_spectrogram_ema_ref(**req, **st), return_mode="median")
    else:
        row["torch_ms"] = None
        row["torch_skipped"] = f"needs ~{ref_gb:.0f} GB of fp32 temporaries"
    # the chunk's own attention over the same (contiguous copy of the) keys and values
    keys = nk.gather_keys(req["key_cache"], req["layout"], req["block_table"])[:n_live]
    k = keys.permute(1, 0, 2).unsqueeze(0)
    v = torch.randn_like(k)
    qh = req["q"].permute(1, 0, 2).unsqueeze(0)
    mask = req["positions"].view(1, -1) <= req["query_positions"].view(-1, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_ms"] = do_bench(lambda: sdpa(qh, k, v, attn_mask=mask, enable_gqa=True), return_mode="median")
    elt = torch.finfo(dtype).bits // 8
    moved = (
        2 * n_live * a.kv_heads * a.head_dim * elt  # keys, read by both passes
        + a.n_up * a.q_heads * a.head_dim * elt
        + 2 * n_live * a.kv_heads * (16 + 17) * 4
    )  # EMA state + pad, read and written
    row["fused_bytes"] = moved
    row["fused_GBps"] = moved / (row["fused_ms"] * 1e-3) / 1e9
    # agreement, so a fast wrong kernel cannot report
    if row["torch_ms"] is not None:
        s_k, _ = fused()
        s_t, _ = nk.paged_spectrogram_ema_ref(**req, **st)
        row["max_rel_err"] = float(((s_k - s_t).abs().max() / s_t.abs().max()).item())
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["n_live"] for r in rows]
    for key, label in (
        ("fused_ms", "fused Triton"),
        ("two_step_ms", "Triton columns + STFT/EMA"),
        ("torch_ms", "torch reference"),
        ("sdpa_ms", "chunk attention (SDPA)"),
    ):
        pts = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens (live, per request)")
    ax.set_ylabel("ms per layer per n_up chunk (median)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "kernels_bench: no CUDA device; these are GPU timings and the Triton interpreter "
            "would give meaningless figures. Run it on a machine with an NVIDIA GPU.",
            file=sys.stderr,
        )
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    lengths = [int(x) for x in a.lengths.split(",") if x]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name()
    rows = []
    for n in lengths:
        t0 = time.time()
        row = bench_length(n, a, dtype)
        rows.append(row)
        torch_txt = f"{row['torch_ms']:.3f}" if row["torch_ms"] is not None else "skipped"
        print(
            f"[{len(rows)}/{len(lengths)}] n={n:>7}: fused {row['fused_ms']:.3f} ms "
            f"({row['fused_GBps']:.0f} GB/s), two-step {row['two_step_ms']:.3f} ms, torch {torch_txt} ms, "
            f"chunk SDPA {row['sdpa_ms']:.3f} ms  [{time.time() - t0:.0f}s]",
            flush=True,
        )
        torch.cuda.empty_cache()
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "dtype": a.dtype,
        "n_up": a.n_up,
        "q_heads": a.q_heads,
        "kv_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "block_size": a.block_size,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(
        rows,
        out / "kernels_bench.png",
        f"NAMM features, {a.q_heads}/{a.kv_heads} heads, d={a.head_dim}, {a.dtype}, {device_name}",
    )
    print(f"wrote {out / 'results.json'} and {out / 'kernels_bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
