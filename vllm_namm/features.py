"""NAMM token features in plain torch: the reference every kernel is tested against.

Pipeline per layer and eviction step (DESIGN.md §1, evo-memory
``memory_policy/deep_embedding_spectogram.py`` and ``base_deep_components.py``):

attention columns -> left pad with the previous chunk's last ``n_w - s_w`` values -> Hann
STFT magnitudes (``center=False``) -> EMA over frames with the token's carried state ->
normalise -> prepend the sinusoidal oldness embedding.

Layout: every per-token tensor is ``[kv_heads, n_tokens, ...]``, tokens oldest first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vllm_namm import kernels
from vllm_namm.config import FeatureConfig
from vllm_namm.policies.base import PolicyState, filter_tokens

PagedFeatures = Callable[[Tensor, Tensor, Tensor, FeatureConfig], tuple[Tensor, Tensor]]
"""(prev_pad, prev_ema, first_frame, features) -> (ema, pad), computed from the paged cache with the
window, hop and EMA discount of ``features``."""


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


class NammFeatureState(PolicyState):
    """Per-request, per-layer memory of the feature pipeline.

    ``ema`` [kv_heads, n_tokens, bins]: the EMA'd (unnormalised) spectrogram of every cached
    token; ``pad`` [kv_heads, n_tokens, n_w - s_w]: the token's last attention values, the
    left padding of its next STFT. ``params`` optionally overrides the scorer's flat parameter
    vector for this request (evolution sends one candidate per request).
    """

    def __init__(self, cfg: FeatureConfig, params: Tensor | None = None) -> None:
        self.cfg = cfg
        self.ema: Tensor | None = None
        self.pad: Tensor | None = None
        self.params = params

    @property
    def num_tokens(self) -> int:
        return 0 if self.ema is None else self.ema.shape[1]

    def extend(self, kv_heads: int, num_new: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """State for the tokens of this step: carried values, zeros for the ``num_new`` newcomers."""
        cfg = self.cfg
        if self.ema is None:
            self.ema = torch.zeros(kv_heads, 0, cfg.bins, device=device)
            self.pad = torch.zeros(kv_heads, 0, cfg.pad, device=device)
        assert self.pad is not None
        if self.ema.shape[0] != kv_heads:
            raise ValueError(f"state has {self.ema.shape[0]} KV heads, view has {kv_heads}")
        ema = torch.cat([self.ema, self.ema.new_zeros(kv_heads, num_new, cfg.bins)], dim=1)
        pad = torch.cat([self.pad, self.pad.new_zeros(kv_heads, num_new, cfg.pad)], dim=1)
        return ema, pad

    def filter(self, keep: Tensor) -> None:
        if self.ema is None:
            return
        assert self.pad is not None
        self.ema = filter_tokens(self.ema, keep)
        self.pad = filter_tokens(self.pad, keep)


def spectral_features(
    attn: Tensor | None,
    positions: Tensor,
    query_positions: Tensor,
    num_new_tokens: int,
    state: NammFeatureState,
    paged: PagedFeatures | None = None,
    backend: kernels.Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Update ``state`` with this step's attention; return (ema [kv, n, bins], bad [kv, n]).

    The STFT + EMA runs in :mod:`vllm_namm.kernels` (an exact matmul form on CPU, Triton on
    GPU); with ``attn`` None, ``paged`` computes it straight from the paged cache (the fused
    GPU kernel, which never materialises the attention columns).

    ``bad`` flags tokens whose new frames are not finite (NaN/inf attention): their EMA state
    keeps the decayed previous value and their returned features are NaN, so the policy can
    keep them instead of letting one broken step poison or evict them.
    """
    cfg = state.cfg
    kv_heads, n_tokens = positions.shape
    device = positions.device
    prev_ema, prev_pad = state.extend(kv_heads, num_new_tokens, device)
    if prev_ema.shape[1] != n_tokens:
        raise ValueError(
            f"state tracks {state.num_tokens} tokens + {num_new_tokens} new, but attention covers "
            f"{n_tokens}: the state was not filtered with the cache"
        )
    shared = positions.stride(0) == 0 or kv_heads == 1  # one token set for every head (the engine)
    first = kernels.first_valid_frame(positions[0] if shared else positions, query_positions, cfg.s_w)
    if attn is not None:
        ema, new_pad = kernels.spectrogram_ema(attn, prev_pad, prev_ema, first, cfg.gamma, backend, cfg.n_w, cfg.s_w)
    elif paged is not None:
        ema, new_pad = paged(prev_pad, prev_ema, first, cfg)
    else:
        raise ValueError("spectral features need the attention columns or a paged feature source")
    n_frames = query_positions.numel() // cfg.s_w
    bad = ~torch.isfinite(ema).all(dim=-1)
    if bool(bad.any()):
        state.ema = torch.where(bad.unsqueeze(-1), prev_ema * cfg.gamma**n_frames, ema)
        state.pad = torch.where(bad.unsqueeze(-1), torch.zeros_like(new_pad), new_pad)
        return ema.masked_fill(bad.unsqueeze(-1), float("nan")), bad
    state.ema, state.pad = ema, new_pad
    return ema, bad


def token_features(
    ema: Tensor,
    positions: Tensor,
    newest_position: int | Tensor,
    cfg: FeatureConfig,
    mean: Tensor,
    std: Tensor,
) -> Tensor:
    """Scorer input [kv, n, pos_dims + bins] = [oldness embedding, normalised spectrogram].

    Order as evo-memory's ``RecencyEmbeddingWrapper`` (recency first, ``append``). Only the
    spectrogram is normalised (the online normalisation sits on ``AttentionSpectrogram``).
    Oldness = newest position - position + ``start_oldness_from`` (evo ``compute_recency``).
    """
    oldness = newest_position - positions + cfg.start_oldness_from
    parts = [oldness_embedding(oldness, cfg.pos_dims, cfg.pos_max_freq)] if cfg.pos_dims else []
    parts.append(normalise(ema, mean, std))
    return torch.cat(parts, dim=-1)


__all__ = [
    "NammFeatureState",
    "attention_columns",
    "gqa_average",
    "normalise",
    "oldness_embedding",
    "spectral_features",
    "token_features",
]
