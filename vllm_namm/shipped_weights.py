"""The weights files shipped in ``vllm_namm/data/``, by name.

``--namm-weights`` takes a path or one of these names, so the hand-set starting point stays one
word away after evolved weights became the default. Kept free of imports so that the config
models can resolve names without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

DATA_DIR = Path(__file__).resolve().parent / "data"

EVOLVED_WEIGHTS = DATA_DIR / "evolved_l2_tiny_llama.safetensors"
"""The default: an MLP scorer (26 inputs: the attention features and the key norm) for our own
``namm-tiny-llama``, ranked under a 0.3 budget. CMA-ES re-weighted its final layer starting
from the L2 ranking written as a NAMM scorer (``evolve.fit --init l2``); on held-out prompts it
ties L2 and beats streaming, H2O and SnapKV (README). Provenance in the file
(``python -m vllm_namm.weights inspect evolved``)."""

EVOLVED_ATTN_WEIGHTS = DATA_DIR / "evolved_tiny_llama.safetensors"
"""The default until 2026-12-02: evolved from an offline fit of the 25 attention features alone
(the paper's inputs); beats streaming and SnapKV, ties H2O on our held-out prompts."""

EVOLVED_KEYNORM_WEIGHTS = DATA_DIR / "evolved_keynorm_tiny_llama.safetensors"
"""Evolved from the L2 ranking with every layer free; it moved away from L2 (0.667 vs L2's 0.800
on held-out prompts at 0.3 retained, README)."""

SMOLLM2_WEIGHTS = DATA_DIR / "l2_smollm2.safetensors"
"""For SmolLM2-135M-Instruct (the real model the install script fetches): the L2 ranking written as a
NAMM scorer over that model's feature statistics, mean page scores, a 0.25 budget. Not evolved (a
generation did not fit the CPU); on held-out real text it is measured against H2O and SnapKV in
docs/results/2026-12-06-smollm2-real-text.md."""

EVOLVED_SMOLLM2_WEIGHTS = DATA_DIR / "evolved_smollm2.safetensors"
"""For SmolLM2-135M-Instruct: ``l2-smollm2``'s output layer evolved by CMA-ES against the offline
proxy (``python -m evolve.proxy``; 30 generations of 16). It keeps more of the asked facts on the
proxy (0.705 against 0.649) but not more answers on held-out real text (it ties ``l2-smollm2``: 4 / 4
paired in one run of 80 prompts), so it comes after ``l2-smollm2`` in the order the served model's
weights are chosen in (docs/results/2026-12-07-smollm2-evolution.md)."""

HAND_WEIGHTS = DATA_DIR / "initial_weights.safetensors"
"""The hand-set BAM (keep a token with non-negligible attention); written by
``python -m evolve.initial_weights``."""

SHIPPED_WEIGHTS: Mapping[str, Path] = MappingProxyType(
    {
        "evolved": EVOLVED_WEIGHTS,
        "evolved-attn": EVOLVED_ATTN_WEIGHTS,
        "evolved-kn": EVOLVED_KEYNORM_WEIGHTS,
        "l2-smollm2": SMOLLM2_WEIGHTS,
        "evolved-smollm2": EVOLVED_SMOLLM2_WEIGHTS,
        "hand": HAND_WEIGHTS,
    }
)
DEFAULT_WEIGHTS = EVOLVED_WEIGHTS
"""What ``--kv-eviction namm`` loads without ``--namm-weights`` when no shipped weights were made for
the served model's shape (the first of ``SHIPPED_WEIGHTS`` that was is loaded instead: on SmolLM2,
``l2-smollm2``, best on held-out real text), and what evolution starts from."""


def resolve_weights(value: str | Path) -> Path:
    """A shipped name (``evolved``, ``evolved-attn``, ``evolved-kn``, ``l2-smollm2``, ``evolved-smollm2``,
    ``hand``) → its file; else a path."""
    return SHIPPED_WEIGHTS.get(str(value), Path(value))
