"""NAMM feature kernels (installed as ``namm_kernels``; the folder is ``kernels/``).

Each computation has three versions side by side: a plain torch reference (``*_ref``,
obviously right, slow), an exact fast torch version (``*_torch``: what CPUs run) and a
Triton kernel (``*_triton``: what GPUs run). Tests hold both fast versions to the reference.
The entry points below pick one with ``backend``: ``"auto"`` runs Triton when the tensors
are on CUDA and torch otherwise (the Triton interpreter on CPU is for tests only),
``"triton"`` / ``"torch"`` force a side. The Triton kernels are written for NAMM's STFT
window 32 and hop 16 only and say so when asked for anything else.
"""

from __future__ import annotations

from typing import Literal

import torch

from .cpu_columns import attention_column_sums_dense, attention_columns_dense, column_blocks
from .paged_attention_columns import (
    PagedKeyLayout,
    attention_columns_paged_ref,
    attention_columns_paged_torch,
    attention_columns_paged_triton,
    gather_keys,
)
from .spectrogram_ema import (
    DEFAULT_GAMMA,
    HOP,
    N_BINS,
    N_FFT,
    ema_reduce,
    first_valid_frame,
    frame_weights,
    hann_window,
    paged_spectrogram_ema_ref,
    paged_spectrogram_ema_triton,
    spectrogram_ema_ref,
    spectrogram_ema_torch,
    spectrogram_ema_triton,
    stft_basis,
    stft_magnitudes,
)

Backend = Literal["auto", "triton", "torch", "reference"]
"""``reference`` runs the plain torch references: slow, for checking the fast paths end to end."""

__all__ = [
    "DEFAULT_GAMMA",
    "HOP",
    "N_BINS",
    "N_FFT",
    "Backend",
    "PagedKeyLayout",
    "attention_column_sums_dense",
    "attention_columns_dense",
    "attention_columns_paged",
    "attention_columns_paged_ref",
    "attention_columns_paged_torch",
    "attention_columns_paged_triton",
    "check_triton_stft",
    "column_blocks",
    "ema_reduce",
    "first_valid_frame",
    "frame_weights",
    "hann_window",
    "gather_keys",
    "paged_spectrogram_ema",
    "paged_spectrogram_ema_ref",
    "paged_spectrogram_ema_triton",
    "resolve_backend",
    "spectrogram_ema",
    "spectrogram_ema_ref",
    "spectrogram_ema_torch",
    "spectrogram_ema_triton",
    "stft_basis",
    "stft_magnitudes",
    "triton_stft_supported",
]


def resolve_backend(backend: Backend, tensor: torch.Tensor) -> Literal["triton", "torch", "reference"]:
    """``auto`` → Triton on CUDA tensors, torch elsewhere."""
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend not in ("triton", "torch", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton', 'torch' or 'reference', not {backend!r}")
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
    fn = {
        "triton": attention_columns_paged_triton,
        "torch": attention_columns_paged_torch,
        "reference": attention_columns_paged_ref,
    }[resolve_backend(backend, q)]
    return fn(q, key_cache, layout, block_table, positions, query_positions, scale)


def triton_stft_supported(n_fft: int, hop: int) -> bool:
    """Whether the Triton STFT kernels can run this window/hop (their tiles are NAMM's 32/16)."""
    return (n_fft, hop) == (N_FFT, HOP)


def check_triton_stft(n_fft: int, hop: int) -> None:
    """The Triton STFT kernels hard-code NAMM's window 32 / hop 16 (tile shapes): say so."""
    if not triton_stft_supported(n_fft, hop):
        raise ValueError(
            f"the Triton STFT kernels support n_w={N_FFT}, s_w={HOP} only, not n_w={n_fft}, s_w={hop}; "
            "use the torch backend (--namm-kernels torch)"
        )


def spectrogram_ema(
    columns: torch.Tensor,
    prev_pad: torch.Tensor | None = None,
    prev_state: torch.Tensor | None = None,
    first_frame: torch.Tensor | None = None,
    gamma: float = DEFAULT_GAMMA,
    backend: Backend = "auto",
    n_fft: int = N_FFT,
    hop: int = HOP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann-STFT magnitudes + EMA of materialised columns ``[kv_heads, n_q, n_tok]``.

    Returns (state ``[kv_heads, n_tok, bins]``, pad ``[kv_heads, n_tok, n_fft - hop]``), fp32.
    ``auto`` falls back to torch for a window/hop the Triton kernel does not support, or for a
    per-head ``first_frame``.
    """
    side = resolve_backend(backend, columns)
    if side == "reference":
        return spectrogram_ema_ref(columns, prev_pad, prev_state, first_frame, gamma, n_fft, hop)
    triton_ok = triton_stft_supported(n_fft, hop) and (first_frame is None or first_frame.dim() == 1)
    if side == "triton" and (triton_ok or backend == "triton"):
        check_triton_stft(n_fft, hop)
        return spectrogram_ema_triton(columns, prev_pad, prev_state, first_frame, gamma)
    return spectrogram_ema_torch(columns, prev_pad, prev_state, first_frame, gamma, n_fft, hop)


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
    n_fft: int = N_FFT,
    hop: int = HOP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole feature pipeline from paged q/k to (EMA state, carried pad); fused on GPU.

    The fused Triton kernel supports window 32 / hop 16 only and raises for anything else
    (:func:`check_triton_stft`); the torch and reference sides take any window/hop.
    """
    side = resolve_backend(backend, q)
    if side == "reference":
        cols = attention_columns_paged_ref(
            q, key_cache, layout, block_table, positions, query_positions, scale
        )
        return spectrogram_ema_ref(cols, prev_pad, prev_state, first_frame, gamma, n_fft, hop)
    if side == "triton":
        check_triton_stft(n_fft, hop)
        return paged_spectrogram_ema_triton(
            q,
            key_cache,
            layout,
            block_table,
            positions,
            query_positions,
            scale,
            prev_pad,
            prev_state,
            first_frame,
            gamma,
        )
    cols = attention_columns_paged_torch(q, key_cache, layout, block_table, positions, query_positions, scale)
    return spectrogram_ema_torch(cols, prev_pad, prev_state, first_frame, gamma, n_fft, hop)
