"""Attention columns on CPU: the exact fast torch path, and the reductions policies read from them.

The definition is ``attention_columns_paged_ref`` (explicit scores, causal mask, softmax, mean over
each GQA group). What makes this path fast on a CPU core, measured at SmolLM2's shapes (9 query / 3
KV heads, head dim 64, 512 queries, 1 200 keys: 25 ms -> 17 ms a layer, one thread):

* queries go in blocks whose scores fit in the core's L2 cache (``max_block_elems``), through two
  buffers allocated once per call: a fresh multi-megabyte tensor per block costs its page faults
  (a third of the GEMM's time) and every pass over it goes to memory;
* the GEMM writes the scaled scores itself (``baddbmm`` with ``alpha = scale``, no extra pass), and
  GQA is a reshape of the queries ([kv, query, group] rows), not a copy of the keys;
* one ``softmax`` per block (torch's fused row kernel: max, exp, sum and scale in two passes over a
  row in cache; separate ``amax``/``sub``/``exp``/``div`` passes took 2.7x as long);
* with sorted key positions only the key suffix newer than a block's oldest query is masked.

:func:`column_blocks` yields the probabilities block by block, so that a policy needing less than
the whole ``[kv, n_q, n]`` matrix never writes it: :func:`attention_column_sums_dense` (H2O reads
only each token's attention summed over the queries).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

DEFAULT_BLOCK_ELEMS = 1 << 18
"""Scores per query block (1 MiB of fp32: one core's L2 here); a block has at least one query."""


def column_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(q0, q1, p)`` per query block: ``p`` ``[Hkv, q1 - q0, G, n]`` fp32 softmax probabilities of
    queries ``q0:q1`` (query head ``kv * G + g`` at ``p[kv, :, g]``), causal by logical position; a
    query that sees no key gets zeros. ``p`` is a view of a buffer reused by the next block."""
    n_q, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    if n == 0 or n_q == 0:
        return
    kt = k.float().permute(1, 2, 0).contiguous()  # [Hkv, D, n]
    qg = q.float().reshape(n_q, hkv, g, d).transpose(0, 1).contiguous()  # [Hkv, n_q, G, D]
    pos_sorted = positions.numel() < 2 or bool((positions[1:] >= positions[:-1]).all())
    visible = (positions.view(1, -1) <= query_positions.view(-1, 1)).sum(1) if not pos_sorted else None
    if visible is None:
        visible = torch.searchsorted(positions, query_positions, right=True)
    bq = max(1, min(n_q, max_block_elems // max(1, hq * n)))
    scores = torch.empty(hkv, bq * g, n, dtype=torch.float32, device=q.device)
    probs = torch.empty_like(scores)
    for q0 in range(0, n_q, bq):
        q1 = min(n_q, q0 + bq)
        b = q1 - q0
        s, p = scores[:, : b * g], probs[:, : b * g]
        torch.baddbmm(s, qg[:, q0:q1].reshape(hkv, b * g, d), kt, beta=0, alpha=scale, out=s)
        qpos = query_positions[q0:q1]
        lo = int(torch.searchsorted(positions, qpos.min(), right=True)) if pos_sorted else 0
        if lo < n:  # keys [0, lo) are visible to every query of the block
            hidden = positions[lo:].view(1, -1) > qpos.view(-1, 1)  # [b, n - lo]
            s.view(hkv, b, g, n)[..., lo:].masked_fill_(hidden.view(1, b, 1, n - lo), float("-inf"))
        torch.softmax(s, dim=-1, out=p)
        p4 = p.view(hkv, b, g, n)
        blind = visible[q0:q1] == 0
        if bool(blind.any()):  # softmax over no key is NaN; the definition says 0
            p4[:, blind] = 0.0
        yield q0, q1, p4


def attention_columns_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> torch.Tensor:
    """Exact fast torch version of the columns: q ``[n_q, Hq, D]``, k ``[n, Hkv, D]`` → ``[Hkv, n_q, n]`` fp32."""
    n_q, hq, _ = q.shape
    n, hkv = k.shape[0], k.shape[1]
    out = torch.zeros(hkv, n_q, n, dtype=torch.float32, device=q.device)
    g = hq // hkv
    for q0, q1, p in column_blocks(q, k, positions, query_positions, scale, max_block_elems):
        torch.sum(p, dim=2, out=out[:, q0:q1])
    return out.div_(g)


def attention_column_sums_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    max_block_elems: int = DEFAULT_BLOCK_ELEMS,
) -> torch.Tensor:
    """``attention_columns_dense(...).sum(1)`` without the ``[Hkv, n_q, n]`` matrix: ``[Hkv, n]`` fp32,
    each token's GQA-averaged attention summed over the queries (what H2O accumulates)."""
    n_q, hq, _ = q.shape
    n, hkv = k.shape[0], k.shape[1]
    out = torch.zeros(hkv, n, dtype=torch.float32, device=q.device)
    g = hq // hkv
    for _, _, p in column_blocks(q, k, positions, query_positions, scale, max_block_elems):
        out.add_(p.sum(dim=(1, 2)))
    return out.div_(g)
