"""NAMM feature kernels (installed as ``namm_kernels``; the folder is ``kernels/``).

Each Triton kernel sits beside a plain torch reference. The entry points below pick one
with ``backend``: ``"auto"`` runs Triton when the tensors are on CUDA and torch
otherwise (the Triton interpreter on CPU is for tests only), ``"triton"`` / ``"torch"``
force a side.
"""

from __future__ import annotations

from typing import Literal

import torch

from .paged_attention_columns import (
    PagedKeyLayout,
    attention_columns_paged_ref,
    attention_columns_paged_triton,
    gather_keys,
)
from .spectrogram_ema import (
    DEFAULT_GAMMA,
    HOP,
    N_BINS,
    N_FFT,
    first_valid_frame,
    paged_spectrogram_ema_ref,
    paged_spectrogram_ema_triton,
    spectrogram_ema_ref,
    spectrogram_ema_triton,
    stft_basis,
)

Backend = Literal["auto", "triton", "torch"]

__all__ = [
    "DEFAULT_GAMMA",
    "HOP",
    "N_BINS",
    "N_FFT",
    "Backend",
    "PagedKeyLayout",
    "attention_columns_paged",
    "attention_columns_paged_ref",
    "attention_columns_paged_triton",
    "first_valid_frame",
    "gather_keys",
    "paged_spectrogram_ema",
    "paged_spectrogram_ema_ref",
    "paged_spectrogram_ema_triton",
    "resolve_backend",
    "spectrogram_ema",
    "spectrogram_ema_ref",
    "spectrogram_ema_triton",
    "stft_basis",
]


def resolve_backend(backend: Backend, tensor: torch.Tensor) -> Literal["triton", "torch"]:
    """``auto`` → Triton on CUDA tensors, torch elsewhere."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', not {backend!r}")
    return backend


def attention_columns_paged(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention of each query to each live cached key, averaged over each GQA group.

    q ``[n_q, Hq, D]`` (post-RoPE); ``block_table`` compacted live block ids; ``positions``
    ``[n_live]`` logical position of each live token (causal: key pos ≤ query pos);
    ``query_positions`` ``[n_q]``. Returns ``[kv_heads, n_q, n_live]`` fp32.
    """
    fn = attention_columns_paged_triton if resolve_backend(backend, q) == "triton" else attention_columns_paged_ref
    return fn(q, key_cache, layout, block_table, positions, query_positions, scale)


def spectrogram_ema(
    columns: torch.Tensor,
    prev_pad: torch.Tensor | None = None,
    prev_state: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    gamma: float = DEFAULT_GAMMA,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann-STFT magnitudes + EMA of materialised columns ``[kv_heads, n_q, n_tok]``.

    Returns (state ``[kv_heads, n_tok, 17]``, pad ``[kv_heads, n_tok, 16]``), fp32.
    """
    fn = spectrogram_ema_triton if resolve_backend(backend, columns) == "triton" else spectrogram_ema_ref
    return fn(columns, prev_pad, prev_state, first_frame, gamma)


def paged_spectrogram_ema(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    layout: PagedKeyLayout,
    block_table: torch.Tensor,
    positions: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    prev_pad: torch.Tensor | None = None,
    prev_state: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    gamma: float = DEFAULT_GAMMA,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole feature pipeline from paged q/k to (EMA state, carried pad); fused on GPU."""
    fn = paged_spectrogram_ema_triton if resolve_backend(backend, q) == "triton" else paged_spectrogram_ema_ref
    return fn(q, key_cache, layout, block_table, positions, query_positions, scale,
              prev_pad, prev_state, first_frame, gamma)
