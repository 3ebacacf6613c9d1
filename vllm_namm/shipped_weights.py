"""The weights files shipped in ``vllm_namm/data/``, by name.

``--namm-weights`` takes a path or one of these names, so the hand-set starting point stays one
word away after evolved weights became the default. Kept free of imports so that the config
models can resolve names without a cycle.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

EVOLVED_WEIGHTS = DATA_DIR / "evolved_tiny_llama.safetensors"
"""CMA-ES-evolved MLP scorer (ranked under a 0.3 budget) for our own ``namm-tiny-llama``; its
provenance is in the file (``python -m vllm_namm.weights inspect evolved``)."""

EVOLVED_KEYNORM_WEIGHTS = DATA_DIR / "evolved_keynorm_tiny_llama.safetensors"
"""CMA-ES-evolved MLP scorer that also reads the key norm (26 inputs), evolved from the L2
ranking; better than ``evolved`` on our held-out prompts on average (0.633 vs 0.500 at 0.3
retained, README), but wrong on the demo's prompt, so not the default."""

HAND_WEIGHTS = DATA_DIR / "initial_weights.safetensors"
"""The hand-set BAM (keep a token with non-negligible attention); written by
``python -m vllm_namm.initial_weights``."""

SHIPPED_WEIGHTS: dict[str, Path] = {
    "evolved": EVOLVED_WEIGHTS,
    "evolved-kn": EVOLVED_KEYNORM_WEIGHTS,
    "hand": HAND_WEIGHTS,
}
DEFAULT_WEIGHTS = EVOLVED_WEIGHTS
"""What ``--kv-eviction namm`` loads without ``--namm-weights`` and what evolution starts from."""


def resolve_weights(value: str | Path) -> Path:
    """A shipped name (``evolved``, ``evolved-kn``, ``hand``) → its file; anything else is a path."""
    return SHIPPED_WEIGHTS.get(str(value), Path(value))
