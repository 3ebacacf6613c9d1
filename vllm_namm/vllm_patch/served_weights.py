"""NAMM weights against the served model: the shipped weights made for it, or one line saying the
weights in use were made for another.

A scorer reads attention and key statistics of the model it was evolved against (the tiny
model's weights lose SmolLM2's needles), so ``--kv-eviction namm`` without ``--namm-weights``
loads the shipped weights whose provenance names the served model's shape, and weights of another
shape are named in the log instead of serving silently with memory tuned for something else.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_namm.config import EvictionConfig
from vllm_namm.model_match import foreign_model_note, shape_of_model
from vllm_namm.policies.registry import policy_class
from vllm_namm.weights import shipped_weights_for

logger = logging.getLogger("vllm.namm")


def weights_for_served_model(cfg: EvictionConfig, model: str) -> tuple[EvictionConfig, str | None]:
    """(``cfg``, None), or with a weights-reading policy and no weights given, the config naming the
    shipped weights evolved for ``model``'s shape and their name (logged; the flag overrides)."""
    reads_weights = "weights" in policy_class(cfg.policy).Settings.model_fields
    if not reads_weights or cfg.weights is not None:  # type: ignore[attr-defined]
        return cfg, None
    match = shipped_weights_for(shape_of_model(model))
    if match is None:
        return cfg, None
    name, path = match
    logger.info(
        "vllm-namm: NAMM weights %s (%s), shipped for this model's shape; --namm-weights overrides",
        name,
        path.name,
    )
    return cfg.model_copy(update={"weights": path}), name


def note_foreign_weights(policy: Any, cfg: EvictionConfig, model: str) -> None:
    """One log line when the NAMM weights were evolved for a model of another shape."""
    weights = getattr(policy, "weights", None)
    provenance = getattr(weights, "provenance", None)
    if provenance is None:
        return
    note = foreign_model_note(
        str(getattr(cfg, "weights", None) or "(the default)"),
        provenance.model_shape,
        provenance.base_model,
        shape_of_model(model),
    )
    if note is not None:
        logger.warning(note)
