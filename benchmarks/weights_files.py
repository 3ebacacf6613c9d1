"""Weights files the benchmarks need besides the shipped ones: random, non-zero scorers.

Why: the shipped hand-set BAM has a zero value projection, so its attention is skipped exactly
and costs nothing; an evolved scorer will not be so kind. ``random:KIND`` (``random:bam``,
``random:bam-w32``, ``random:mlp``) stands for a scorer of that kind with random non-zero
parameters, i.e. what serving an evolved scorer of that kind costs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vllm_namm.scorers import ScorerConfig
from vllm_namm.weights import NammWeights, save_weights

PREFIX = "random:"


def random_weights(kind: str, seed: int = 0, scale: float = 0.1) -> NammWeights:
    """``kind``: ``bam``, ``bam-wN`` (windowed BAM, N newer neighbours) or ``mlp``."""
    window = None
    if kind.startswith("bam-w"):
        window = int(kind.removeprefix("bam-w"))
        kind = "bam"
    if kind not in ("bam", "mlp"):
        raise ValueError(f"random weights kind must be bam, bam-wN or mlp, not {kind!r}")
    w = NammWeights.zeros(ScorerConfig(kind=kind, window=window))  # type: ignore[arg-type]
    w.params = scale * torch.randn(w.params.shape, generator=torch.Generator().manual_seed(seed))
    return w


def resolve(spec: str, out_dir: Path) -> str:
    """A weights path as the benchmarks accept it: a file, or ``random:KIND`` written into ``out_dir``."""
    if not spec.startswith(PREFIX):
        return spec
    kind = spec.removeprefix(PREFIX)
    path = out_dir / f"random-{kind}.safetensors"
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        save_weights(path, random_weights(kind))
    return str(path)
