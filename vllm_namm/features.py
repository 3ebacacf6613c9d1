"""NAMM token features in plain torch: the reference every kernel is tested against.

Pipeline per layer and eviction step (DESIGN.md §1, evo-memory
``memory_policy/deep_embedding_spectogram.py`` and ``base_deep_components.py``):

attention columns -> left pad with the previous chunk's last ``n_w - s_w`` values -> Hann
STFT magnitudes (``center=False``) -> EMA over frames with the token's carried state ->
normalise -> prepend the sinusoidal oldness embedding.

Layout: every per-token tensor is ``[kv_heads, n_tokens, ...]``, tokens oldest first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_namm.config import FeatureConfig
from vllm_namm.policies.base import PolicyState, filter_tokens


def hann_window(n_w: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Periodic Hann window (evo-memory: ``torch.hann_window(32, periodic=True)``)."""
    return torch.hann_window(n_w, periodic=True, device=device, dtype=dtype)


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
    ``key_positions`` [n_k] or [kv_heads, n_k]. Causality is by *logical* position (a query
    sees keys whose position is <= its own), so it stays right after tokens were evicted.
    Queries that see no key get an all-zero row instead of NaN.
    """
    n_q, q_heads, d = queries.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    scale = d**-0.5 if scale is None else scale
    q = queries.float().reshape(n_q, kv_heads, groups, d).permute(1, 2, 0, 3)  # [kv, g, n_q, d]
    k = keys.float().permute(1, 2, 0)  # [kv, d, n_k]
    logits = torch.matmul(q, k.unsqueeze(1)) * scale  # [kv, g, n_q, n_k]
    kpos = key_positions if key_positions.dim() == 2 else key_positions.unsqueeze(0).expand(kv_heads, -1)
    visible = kpos.unsqueeze(1) <= query_positions.view(1, -1, 1)  # [kv, n_q, n_k]
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(nan=0.0)
    return probs.mean(dim=1)


def stft_magnitudes(columns: Tensor, carried_pad: Tensor, n_w: int = 32, s_w: int = 16) -> Tensor:
    """[..., n_q] attention columns -> [..., n_q // s_w, n_w // 2 + 1] STFT magnitudes.

    ``carried_pad`` [..., n_w - s_w] are the same tokens' last attention values of the previous
    chunk (zeros for a new sequence or for tokens new in this chunk), so a chunk of ``n_q``
    queries gives exactly ``n_q / s_w`` frames and consecutive chunks tile the column without
    gap or overlap (evo-memory ``AttentionSpectrogram``). ``n_q`` must be a multiple of
    ``s_w``: evo-memory raises otherwise, and the callers only step at multiples of n_up.
    """
    n_q = columns.shape[-1]
    if n_q % s_w:
        raise ValueError(f"{n_q} queries is not a multiple of the STFT hop {s_w}")
    if carried_pad.shape[-1] != n_w - s_w:
        raise ValueError(f"carried pad has {carried_pad.shape[-1]} values, expected {n_w - s_w}")
    x = torch.cat([carried_pad.to(columns.dtype), columns], dim=-1).float()
    frames = x.unfold(-1, n_w, s_w)  # [..., n_frames, n_w]
    spec = torch.fft.rfft(frames * hann_window(n_w, x.device), dim=-1)
    return spec.abs()


def ema_weights(n_frames: int, gamma: float, device: torch.device | None = None) -> Tensor:
    """Frame weights oldest..newest: (1 - gamma) * gamma**(n_frames-1 ... 0).

    evo-memory ``reduce_ema_values``: the newest frame weighs (1 - gamma), the oldest
    (1 - gamma) * gamma**(n_T - 1); Eq. 4 of the paper reads the other way round.
    """
    exps = torch.arange(n_frames - 1, -1, -1, device=device, dtype=torch.float64)
    return ((1.0 - gamma) * gamma**exps).float()


def ema_reduce(frames: Tensor, prev: Tensor | None, first_frame: Tensor | None, gamma: float) -> Tensor:
    """EMA of ``frames`` [..., n_frames, F] into [..., F], with carried state ``prev`` [..., F].

    ``first_frame`` [...] (int): a token's frames before this index are masked out (they
    precede the token's entry into the cache; evo-memory's strided causal mask). ``prev``
    (0 for new tokens) is carried with ``gamma ** n_frames``.
    """
    n_frames = frames.shape[-2]
    w = ema_weights(n_frames, gamma, frames.device)  # [n_frames]
    if first_frame is not None:
        idx = torch.arange(n_frames, device=frames.device)
        w = w * (idx >= first_frame.unsqueeze(-1)).to(w.dtype)  # [..., n_frames]
    else:
        w = w.expand(frames.shape[:-1])
    out = (frames * w.unsqueeze(-1)).sum(dim=-2)
    if prev is not None:
        out = out + prev.to(out.dtype) * gamma**n_frames
    return out


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


def first_frame_index(positions: Tensor, query_positions: Tensor, s_w: int) -> Tensor:
    """First frame in which each token can have attention: (#queries before it) // s_w.

    A token is cached by the query at its own position, so the queries older than it are
    ``searchsorted(query_positions, position)``; tokens older than every query get 0. This is
    evo-memory's strided causal mask, generalised to any mix of old and new tokens.
    """
    qpos = query_positions.contiguous()
    entered = torch.searchsorted(qpos, positions.contiguous(), right=False)
    return torch.div(entered, s_w, rounding_mode="floor")


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
    attn: Tensor,
    positions: Tensor,
    query_positions: Tensor,
    num_new_tokens: int,
    state: NammFeatureState,
) -> tuple[Tensor, Tensor]:
    """Update ``state`` with this step's attention; return (ema [kv, n, bins], bad [kv, n]).

    ``bad`` flags tokens whose new frames are not finite (NaN/inf attention): their EMA state
    keeps the decayed previous value and their returned features are NaN, so the policy can
    keep them instead of letting one broken step poison or evict them.
    """
    cfg = state.cfg
    kv_heads, n_q, n_tokens = attn.shape
    prev_ema, prev_pad = state.extend(kv_heads, num_new_tokens, attn.device)
    if prev_ema.shape[1] != n_tokens:
        raise ValueError(
            f"state tracks {state.num_tokens} tokens + {num_new_tokens} new, but attention covers "
            f"{n_tokens}: the state was not filtered with the cache"
        )
    columns = attn.float().transpose(1, 2)  # [kv, n_tokens, n_q]
    frames = stft_magnitudes(columns, prev_pad, cfg.n_w, cfg.s_w)
    first = first_frame_index(positions, query_positions, cfg.s_w)
    ema = ema_reduce(frames, prev_ema, first, cfg.gamma)
    bad = ~torch.isfinite(ema).all(dim=-1)
    decayed = prev_ema * cfg.gamma ** frames.shape[-2]
    state.ema = torch.where(bad.unsqueeze(-1), decayed, ema)
    new_pad = columns[..., -cfg.pad :] if cfg.pad else columns[..., :0]
    state.pad = torch.where(bad.unsqueeze(-1), torch.zeros_like(new_pad), new_pad)
    return ema.masked_fill(bad.unsqueeze(-1), float("nan")), bad


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
    "ema_reduce",
    "ema_weights",
    "first_frame_index",
    "gqa_average",
    "hann_window",
    "normalise",
    "oldness_embedding",
    "spectral_features",
    "stft_magnitudes",
    "token_features",
]
