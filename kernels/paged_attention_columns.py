"""Attention columns read straight from vLLM's paged key cache.

NAMM scores every cached token from the column of attention that the latest ≤ n_up
queries paid to it. vLLM never materialises attention probabilities, so we recompute
them from the queries we captured and the keys already in the paged cache:

    A[kv, i, j] = mean_{g < G} softmax_j(scale · q[i, kv·G + g] · k[j, kv])   (causal)

(G query heads share one KV head; the mean follows evo-memory's
``MemoryPolicy.process_attn_weights``). Evicted pages are holes in the request's
block table; the engine hands us a *compacted* table (live block ids only) plus the
logical position of every live token, so the causal test ``pos(key) <= pos(query)``
stays right after compaction.

Two passes, as in flash-attention without V:
  1. ``_row_stats_kernel`` – online max / sum of every (query, head) row over all keys,
     split over key ranges so each key is read from HBM about once (partials are
     combined in torch: they are tiny, [splits, heads, queries]).
  2. ``_columns_kernel`` – one program per key tile, looping over every query and head,
     writes normalised probabilities averaged over the GQA group. The fused variant
     (``spectrogram_ema.paged_spectrogram_ema``) reuses pass 1 and goes straight to
     the EMA features instead of writing [kv_heads, queries, keys].

Key-cache layouts (``PagedKeyLayout``) are described by one affine, tiled address
formula, which covers every layout we met in vLLM 0.32.0:

* FlashAttention, vLLM ≤ 0.10: ``kv_cache[2, num_blocks, block_size, kv_heads, D]``.
* FlashAttention, vLLM 0.32.0: logical ``[num_blocks, kv_heads, block_size, 2·D]``
  (any physical stride order); keys are ``kv_cache.transpose(1, 2)[..., :D]``
  (``vllm/v1/attention/backends/flash_attn.py`` line 1252).
* CPU backend, vLLM 0.32.0: ``kv_cache[num_blocks, kv_heads, block_size, 2·D]``; the
  backend views each (block, head) row as ``[2·block_size, D]`` and takes the first
  half as the key region (``vllm/v1/attention/backends/cpu_attn.py`` lines 411-416 and
  474-476). That region is *packed* by ``cpu_attn_reshape_and_cache`` per ISA
  (``layer.isa``, chosen by ``_get_attn_isa`` at line 520): for ``vec``/``vec16`` the
  keys are transposed, element (t, d) at ``d·block_size + t``; for ``amx`` (bf16 only)
  they are VNNI-packed in 16-token tiles, element (t, d) at
  ``(t//16)·16·D + (d//2)·32 + (t%16)·2 + d%2``. Values stay plain ``[block_size, D]``.
  Both facts were checked by calling the installed op (tests/test_kernels.py keeps
  that check when vLLM's CPU ops are importable). NEON/VSX/RVV layouts are untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .cpu_columns import attention_columns_dense

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PagedKeyLayout:
    """Address of key (block b, slot t, kv head h, dim d), in elements from ``key_cache.data_ptr()``::

        b·stride_block + h·stride_head
        + (t // tok_tile)·stride_tok_hi + (t % tok_tile)·stride_tok_lo
        + (d // dim_tile)·stride_dim_hi + (d % dim_tile)·stride_dim_lo

    Build it with one of the constructors below and pass the *same tensor* you built
    it from as ``key_cache``.
    """

    name: str
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    stride_block: int
    stride_head: int
    tok_tile: int
    stride_tok_hi: int
    stride_tok_lo: int
    dim_tile: int
    stride_dim_hi: int
    stride_dim_lo: int

    @classmethod
    def from_key_view(cls, key: torch.Tensor, name: str = "nhd") -> PagedKeyLayout:
        """Any strided ``[num_blocks, block_size, kv_heads, D]`` key view (no packing)."""
        assert key.dim() == 4, "expected [num_blocks, block_size, kv_heads, head_dim]"
        nb, bs, h, d = key.shape
        sb, st, sh, sd = key.stride()
        return cls(name, nb, bs, h, d, sb, sh, bs, 0, st, d, 0, sd)

    @classmethod
    def flash(cls, kv_cache: torch.Tensor, head_dim: int | None = None) -> PagedKeyLayout:
        """FlashAttention caches: legacy ``[2, B, N, H, D]`` or vLLM 0.32 ``[B, H, N, 2·D]``.

        Pass the whole ``kv_cache`` as ``key_cache``: keys sit at its start in both.
        """
        if kv_cache.dim() == 5:
            assert kv_cache.shape[0] == 2, "legacy FlashAttention layout is [2, B, N, H, D]"
            return cls.from_key_view(kv_cache[0], name="flash_legacy")
        assert kv_cache.dim() == 4, "vLLM 0.32 FlashAttention layout is [B, H, N, 2*D]"
        d = head_dim if head_dim is not None else kv_cache.shape[-1] // 2
        return cls.from_key_view(kv_cache.transpose(1, 2)[..., :d], name="flash")

    @classmethod
    def cpu(cls, kv_cache: torch.Tensor, isa: str) -> PagedKeyLayout:
        """vLLM 0.32 CPU backend cache ``[B, H, N, 2·D]`` written with ``isa`` (= ``layer.isa``)."""
        assert kv_cache.dim() == 4, "CPU layout is [num_blocks, kv_heads, block_size, 2*head_dim]"
        nb, h, bs, d2 = kv_cache.shape
        d = d2 // 2
        if kv_cache.stride(3) != 1 or kv_cache.stride(2) != d2 or kv_cache.stride(1) != bs * d2:
            raise ValueError("CPU kv_cache must be contiguous inside each (block, head) row")
        sb, sh = kv_cache.stride(0), kv_cache.stride(1)
        if isa in ("vec", "vec16"):
            return cls(f"cpu_{isa}", nb, bs, h, d, sb, sh, bs, 0, 1, d, 0, bs)
        if isa == "amx":
            if kv_cache.dtype != torch.bfloat16 or bs % 16:
                raise ValueError("the amx CPU layout is bf16 with block_size % 16 == 0")
            return cls("cpu_amx", nb, bs, h, d, sb, sh, 16, 16 * d, 2, 2, 32, 1)
        raise NotImplementedError(f"CPU attention ISA {isa!r}: key layout not verified")

    def kernel_args(self) -> tuple[int, ...]:
        return (
            self.stride_block,
            self.stride_head,
            self.stride_tok_hi,
            self.stride_tok_lo,
            self.stride_dim_hi,
            self.stride_dim_lo,
        )


# ----------------------------------------------------------------------------- torch reference


def gather_keys(key_cache: torch.Tensor, layout: PagedKeyLayout, block_table: torch.Tensor) -> torch.Tensor:
    """Keys of the listed blocks as ``[len(block_table)·block_size, kv_heads, D]`` (plain torch)."""
    lo = layout
    view = torch.as_strided(
        key_cache,
        size=(
            lo.num_blocks,
            lo.num_kv_heads,
            lo.block_size // lo.tok_tile,
            lo.tok_tile,
            lo.head_dim // lo.dim_tile,
            lo.dim_tile,
        ),
        stride=(
            lo.stride_block,
            lo.stride_head,
            lo.stride_tok_hi,
            lo.stride_tok_lo,
            lo.stride_dim_hi,
            lo.stride_dim_lo,
        ),
        storage_offset=key_cache.storage_offset(),
    )
    k = view[block_table.long()].reshape(-1, lo.num_kv_heads, lo.block_size, lo.head_dim)
    return k.transpose(1, 2).reshape(-1, lo.num_kv_heads, lo.head_dim)


def attention_columns_paged_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch: fp32 scores, causal by logical position, softmax, mean over the GQA group."""
    n_q, hq, d = q.shape
    hkv = layout.num_kv_heads
    n_live = positions.numel()
    k = gather_keys(key_cache, layout, block_table)[:n_live].float()  # [n, Hkv, D]
    k = k.repeat_interleave(hq // hkv, dim=1)  # q head h reads kv head h // G
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    visible = positions.view(1, 1, -1) <= query_positions.view(1, -1, 1)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return p.view(hkv, hq // hkv, n_q, n_live).mean(1)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _load_keys_t(
    key_ptr,
    block_table_ptr,
    tok,
    n_live,
    kv_head,
    offs_d,
    s_block,
    s_head,
    s_tok_hi,
    s_tok_lo,
    s_dim_hi,
    s_dim_lo,
    BLOCK_SIZE: tl.constexpr,
    TOK_TILE: tl.constexpr,
    DIM_TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Transposed key tile ``[BLOCK_D, BLOCK_N]`` for live-token indices ``tok`` (0 outside)."""
    valid = tok < n_live
    blk = tl.load(block_table_ptr + tok // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    t = tok % BLOCK_SIZE
    tok_off = blk * s_block + (t // TOK_TILE) * s_tok_hi + (t % TOK_TILE) * s_tok_lo
    dim_off = (offs_d // DIM_TILE) * s_dim_hi + (offs_d % DIM_TILE) * s_dim_lo
    ptrs = key_ptr + kv_head.to(tl.int64) * s_head + dim_off[:, None] + tok_off[None, :]
    return tl.load(ptrs, mask=(offs_d[:, None] < HEAD_DIM) & valid[None, :], other=0.0)


def exact_fp32_dot(q: torch.Tensor) -> bool:
    """fp32 inputs get exact fp32 products (no tf32). bf16 too off-GPU: the Triton 3.9
    interpreter's bf16 ``tl.dot`` returns garbage, so it computes bf16 in fp32 there."""
    return q.dtype == torch.float32 or (not q.is_cuda and q.dtype == torch.bfloat16)


@triton.jit
def _qk(q, kt, IS_FP32: tl.constexpr):
    """q·kᵀ with fp32 accumulation; exact fp32 products when ``IS_FP32``."""
    if IS_FP32:
        return tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(q, kt.to(q.dtype))


@triton.jit
def _row_stats_kernel(
    q_ptr,
    s_qn,
    s_qh,
    qpos_ptr,
    key_ptr,
    block_table_ptr,
    kpos_ptr,
    m_ptr,
    l_ptr,  # [splits, Hq, n_q] partial max (log2 domain) and sum
    n_q,
    n_live,
    split_len,
    qk_scale,
    s_block,
    s_head,
    s_tok_hi,
    s_tok_lo,
    s_dim_hi,
    s_dim_lo,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOK_TILE: tl.constexpr,
    DIM_TILE: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    kv = tl.program_id(0)
    qb = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(0) * GROUP
    # rows = (group member g, query i): all query heads of this KV head share each key load
    r = tl.arange(0, GROUP_PAD * BLOCK_Q)
    g = r // BLOCK_Q
    qi = qb * BLOCK_Q + r % BLOCK_Q
    h = kv * GROUP + g
    row_ok = (g < GROUP) & (qi < n_q)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + qi[:, None] * s_qn + h[:, None] * s_qh + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    qpos = tl.load(qpos_ptr + qi, mask=row_ok, other=-1)
    m_i = tl.full([GROUP_PAD * BLOCK_Q], -1.0e30, tl.float32)
    l_i = tl.zeros([GROUP_PAD * BLOCK_Q], tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, n_live)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        kt = _load_keys_t(
            key_ptr,
            block_table_ptr,
            tok,
            end,
            kv,
            offs_d,
            s_block,
            s_head,
            s_tok_hi,
            s_tok_lo,
            s_dim_hi,
            s_dim_lo,
            BLOCK_SIZE,
            TOK_TILE,
            DIM_TILE,
            HEAD_DIM,
        )
        kpos = tl.load(kpos_ptr + tok, mask=tok < end, other=0)
        s = _qk(q, kt, IS_FP32) * qk_scale
        ok = row_ok[:, None] & (tok[None, :] < end) & (kpos[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    out = (split * n_heads + h) * n_q + qi
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _group_probs(
    q_ptr,
    s_qn,
    s_qh,
    qpos_ptr,
    lse_ptr,
    kt,
    kpos,
    tok_ok,
    kv,
    q0,
    n_q,
    qk_scale,
    offs_d,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    """Mean over the GQA group of normalised probabilities, ``[BLOCK_Q, BLOCK_N]`` fp32."""
    qi = q0 + tl.arange(0, BLOCK_Q)
    q_ok = qi < n_q
    qpos = tl.load(qpos_ptr + qi, mask=q_ok, other=-1)
    ok = q_ok[:, None] & tok_ok[None, :] & (kpos[None, :] <= qpos[:, None])
    acc = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
    for g in range(GROUP):
        h = kv * GROUP + g
        q = tl.load(
            q_ptr + qi[:, None] * s_qn + h * s_qh + offs_d[None, :],
            mask=q_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )
        lse = tl.load(lse_ptr + h * n_q + qi, mask=q_ok, other=float("inf"))
        s = _qk(q, kt, IS_FP32) * qk_scale
        acc += tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    return acc / GROUP


@triton.jit
def _columns_kernel(
    q_ptr,
    s_qn,
    s_qh,
    qpos_ptr,
    lse_ptr,
    key_ptr,
    block_table_ptr,
    kpos_ptr,
    out_ptr,
    n_q,
    n_live,
    qk_scale,
    s_block,
    s_head,
    s_tok_hi,
    s_tok_lo,
    s_dim_hi,
    s_dim_lo,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOK_TILE: tl.constexpr,
    DIM_TILE: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    kv = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_ok = tok < n_live
    offs_d = tl.arange(0, BLOCK_D)
    kt = _load_keys_t(
        key_ptr,
        block_table_ptr,
        tok,
        n_live,
        kv,
        offs_d,
        s_block,
        s_head,
        s_tok_hi,
        s_tok_lo,
        s_dim_hi,
        s_dim_lo,
        BLOCK_SIZE,
        TOK_TILE,
        DIM_TILE,
        HEAD_DIM,
    )
    kpos = tl.load(kpos_ptr + tok, mask=tok_ok, other=0)
    for q0 in range(0, n_q, BLOCK_Q):
        p = _group_probs(
            q_ptr,
            s_qn,
            s_qh,
            qpos_ptr,
            lse_ptr,
            kt,
            kpos,
            tok_ok,
            kv,
            q0,
            n_q,
            qk_scale,
            offs_d,
            GROUP,
            BLOCK_Q,
            BLOCK_N,
            HEAD_DIM,
            IS_FP32,
        )
        qi = q0 + tl.arange(0, BLOCK_Q)
        ptrs = out_ptr + (kv * n_q + qi[:, None]).to(tl.int64) * n_live + tok[None, :]
        tl.store(ptrs, p, mask=(qi[:, None] < n_q) & tok_ok[None, :])


# ----------------------------------------------------------------------------- launchers


def _check_inputs(q, layout, block_table, positions, query_positions) -> None:
    n_q, hq, d = q.shape
    if d != layout.head_dim or hq % layout.num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the cache ({layout.num_kv_heads} kv heads, D={layout.head_dim})"
        )
    if positions.numel() > block_table.numel() * layout.block_size:
        raise ValueError("more live tokens than the compacted block table holds")
    if query_positions.numel() != n_q:
        raise ValueError("one logical position per query")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in head_dim")


def row_lse(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    block_n: int = 64,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Pass 1: log2-domain log-sum-exp of every (head, query) row, ``[Hq, n_q]`` fp32.

    ``+inf`` marks a row that sees no key, so pass 2 turns it into zero probabilities.
    """
    _check_inputs(q, layout, block_table, positions, query_positions)
    n_q, hq, d = q.shape
    hkv = layout.num_kv_heads
    group = hq // hkv
    n_live = positions.numel()
    block_q = 16
    if num_splits is None:  # enough programs to fill the machine, each reading ≥ 4 key tiles
        target = 4 * torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        have = hkv * triton.cdiv(n_q, block_q)
        num_splits = max(1, min(triton.cdiv(target, have), triton.cdiv(n_live, 4 * block_n)))
    split_len = triton.cdiv(triton.cdiv(max(n_live, 1), num_splits), block_n) * block_n
    num_splits = triton.cdiv(max(n_live, 1), split_len)
    m = torch.empty(num_splits, hq, n_q, device=q.device, dtype=torch.float32)
    lsum = torch.empty_like(m)
    grid = (hkv, triton.cdiv(n_q, block_q), num_splits)
    _row_stats_kernel[grid](
        q,
        q.stride(0),
        q.stride(1),
        query_positions,
        key_cache,
        block_table,
        positions,
        m,
        lsum,
        n_q,
        n_live,
        split_len,
        scale * LOG2E,
        *layout.kernel_args(),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
        HEAD_DIM=d,
        BLOCK_SIZE=layout.block_size,
        TOK_TILE=layout.tok_tile,
        DIM_TILE=layout.dim_tile,
        IS_FP32=exact_fp32_dot(q),
    )
    m_all = m.amax(0)
    total = (lsum * torch.exp2(m - m_all)).sum(0)
    return torch.where(total > 0, m_all + torch.log2(total), torch.full_like(total, math.inf))


def attention_columns_paged_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``attention_columns_paged_ref``: ``[kv_heads, n_q, n_live]`` fp32 (into ``out`` if given)."""
    n_q, hq, d = q.shape
    hkv = layout.num_kv_heads
    n_live = positions.numel()
    lse = row_lse(q, key_cache, layout, block_table, positions, query_positions, scale, block_n)
    if out is None:
        out = torch.empty(hkv, n_q, n_live, device=q.device, dtype=torch.float32)
    elif out.shape != (hkv, n_q, n_live) or not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError(f"out must be contiguous fp32 {(hkv, n_q, n_live)}")
    if n_live == 0:
        return out
    _columns_kernel[(hkv, triton.cdiv(n_live, block_n))](
        q,
        q.stride(0),
        q.stride(1),
        query_positions,
        lse,
        key_cache,
        block_table,
        positions,
        out,
        n_q,
        n_live,
        scale * LOG2E,
        *layout.kernel_args(),
        GROUP=hq // hkv,
        BLOCK_Q=16,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
        HEAD_DIM=d,
        BLOCK_SIZE=layout.block_size,
        TOK_TILE=layout.tok_tile,
        DIM_TILE=layout.dim_tile,
        IS_FP32=exact_fp32_dot(q),
    )
    return out


# ----------------------------------------------------------------------------- fast torch path (CPU)


def attention_columns_paged_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The paged entry point of :func:`~.cpu_columns.attention_columns_dense` (keys gathered once, in torch)."""
    _check_inputs(q, layout, block_table, positions, query_positions)
    k = gather_keys(key_cache, layout, block_table)[: positions.numel()]
    return attention_columns_dense(q, k, positions, query_positions, scale)
