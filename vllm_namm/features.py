"""NAMM token features: attention columns, the oldness embedding and the scorer input.

The spectral part (STFT magnitudes + EMA, carried per request in ``NammFeatureState``) lives
with the NAMM policy (:mod:`vllm_namm.policies.namm`); its one torch reference is
``spectrogram_ema_ref`` in ``kernels/`` (:mod:`vllm_namm.kernels`).

Pipeline per layer and eviction step (``docs/design.md`` §1, evo-memory
``memory_policy/deep_embedding_spectogram.py`` and ``base_deep_components.py``):

attention columns -> left pad with the previous chunk's last ``n_w - s_w`` values -> Hann
STFT magnitudes (``center=False``) -> EMA over frames with the token's carried state ->
normalise -> prepend the sinusoidal oldness embedding.

Layout: every per-token tensor is ``[kv_heads, n_tokens, ...]``, tokens oldest first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_namm import kernels
from vllm_namm.settings import FeatureConfig


def gqa_average(attn: Tensor, num_kv_heads: int) -> Tensor:
    """[q_heads, n_q, n_k] -> [kv_heads, n_q, n_k]: mean over the query heads of each KV head.

    Query head ``h`` uses KV head ``h // (q_heads // kv_heads)`` (HF ``repeat_kv`` and vLLM
    layout), as evo-memory's ``MemoryPolicy.process_attn_weights`` assumes.
    """
    q_heads = attn.shape[0]
    if q_heads % num_kv_heads:
        raise ValueError(f"{q_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return attn.reshape(num_kv_heads, q_heads // num_kv_heads, *attn.shape[1:]).mean(dim=1)


def attention_columns(
    queries: Tensor,
    keys: Tensor,
    query_positions: Tensor,
    key_positions: Tensor,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention of each query to each key, GQA-averaged: [kv_heads, n_q, n_k] fp32.

    ``queries`` [n_q, q_heads, d], ``keys`` [n_k, kv_heads, d] (post-RoPE, as cached),
    ``key_positions`` [n_k] (one token set for every head: the engine; the exact blocked kernel
    :func:`vllm_namm.kernels.attention_columns_dense`) or [kv_heads, n_k] (per-head caches: the
    reference runner). Causality is by *logical* position (a query sees keys whose position is
    <= its own), so it stays right after tokens were evicted. Queries that see no key get an
    all-zero row instead of NaN.
    """
    n_q, q_heads, d = queries.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    scale = d**-0.5 if scale is None else scale
    if key_positions.dim() == 1:  # one token set for every head: the exact blocked form
        return kernels.attention_columns_dense(queries, keys, key_positions, query_positions, scale)
    q = queries.float().reshape(n_q, kv_heads, groups, d).permute(1, 2, 0, 3)  # [kv, g, n_q, d]
    k = keys.float().permute(1, 2, 0)  # [kv, d, n_k]
    logits = torch.matmul(q, k.unsqueeze(1)) * scale  # [kv, g, n_q, n_k]
    visible = key_positions.unsqueeze(1) <= query_positions.view(1, -1, 1)  # [kv, n_q, n_k]
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    return probs.mean(dim=1)


def oldness_embedding(oldness: Tensor, dims: int = 8, max_freq: float = 50000.0) -> Tensor:
    """Sinusoidal embedding [..., dims] = [sin(o f_0..f_{k-1}), cos(o f_0..f_{k-1})].

    ``f_j = max_freq ** (-j / k)``, ``k = dims / 2`` (evo-memory ``cos_sin_seq_embeddings``).
    Computed in float64 so large oldness values keep their phase.
    """
    k = dims // 2
    freqs = max_freq ** (-torch.arange(k, device=oldness.device, dtype=torch.float64) / k)
    angles = oldness.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / max(std, 1e-7), fixed statistics stored with the weights."""
    return (x - mean.to(x)) / std.to(x).clamp_min(1e-7)


def token_features(
    ema: Tensor,
    positions: Tensor,
    newest_position: int | Tensor,
    cfg: FeatureConfig,
    mean: Tensor,
    std: Tensor,
    key_norm: Tensor | None = None,
) -> Tensor:
    """Scorer input [kv, n, input_dim] = [oldness embedding, normalised spectrogram (, key norm)].

    Order as evo-memory's ``RecencyEmbeddingWrapper`` (recency first, ``append``). Only the
    spectrogram is normalised (the online normalisation sits on ``AttentionSpectrogram``).
    Oldness = newest position - position + ``start_oldness_from`` (evo ``compute_recency``).
    With ``cfg.key_norm`` the cached key's L2 norm ``key_norm`` [kv, n] follows the bins and is
    normalised with them (its statistics are the last entry of ``mean``/``std``).
    """
    oldness = newest_position - positions + cfg.start_oldness_from
    parts = [oldness_embedding(oldness, cfg.pos_dims, cfg.pos_max_freq)] if cfg.pos_dims else []
    if cfg.key_norm:
        if key_norm is None:
            raise ValueError("these features include the key norm: pass the cached keys' norms")
        ema = torch.cat([ema, key_norm.to(ema).unsqueeze(-1)], dim=-1)
    parts.append(normalise(ema, mean, std))
    return torch.cat(parts, dim=-1)


__all__ = [
    "attention_columns",
    "gqa_average",
    "normalise",
    "oldness_embedding",
    "token_features",
]
