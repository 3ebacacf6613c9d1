"""The NAMM feature kernels as the plugin uses them: the one place that imports ``namm_kernels``.

Why the name differs from the folder: the repository keeps its kernels in ``kernels/`` (the
project layout), but a top-level module named ``kernels`` would shadow the published
``kernels`` package that transformers probes for, so setup.py installs the folder as
``namm_kernels``. Import the kernels through this module (``from vllm_namm import kernels``)
so that readers and tools see the dependency.
"""

from __future__ import annotations

from namm_kernels import (
    Backend,
    PagedKeyLayout,
    attention_column_sums_dense,
    attention_columns_dense,
    attention_columns_paged,
    check_triton_stft,
    ema_reduce,
    first_valid_frame,
    frame_weights,
    gather_keys,
    hann_window,
    paged_spectrogram_ema,
    resolve_backend,
    spectrogram_ema,
    spectrogram_ema_ref,
    stft_magnitudes,
    triton_stft_supported,
)

__all__ = [
    "Backend",
    "PagedKeyLayout",
    "attention_column_sums_dense",
    "attention_columns_dense",
    "attention_columns_paged",
    "check_triton_stft",
    "ema_reduce",
    "first_valid_frame",
    "frame_weights",
    "gather_keys",
    "hann_window",
    "paged_spectrogram_ema",
    "resolve_backend",
    "spectrogram_ema",
    "spectrogram_ema_ref",
    "stft_magnitudes",
    "triton_stft_supported",
]
