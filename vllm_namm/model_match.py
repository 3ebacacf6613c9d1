"""Which model a weights file was evolved for, and whether the served model is that one.

A NAMM scorer reads attention and key statistics of the model it was evolved against; on
another model its scores mean something else (the tiny model's evolved weights rank like L2,
which on SmolLM2 loses the needle). Weights carry the shape of their model in their
provenance, and a server running a model of another shape says so in one log line instead of
silently serving with memory tuned for something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


class ModelShape(BaseModel):
    """What identifies a model family for a scorer: architecture and attention geometry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: str
    layers: int
    kv_heads: int
    hidden_size: int
    vocab_size: int

    def __str__(self) -> str:
        return (
            f"{self.architecture}, {self.layers} layers, {self.kv_heads} KV heads, "
            f"hidden {self.hidden_size}, vocab {self.vocab_size}"
        )


def shape_of_config(config: dict[str, Any]) -> ModelShape | None:
    """A ``config.json``'s shape; None when it lacks a field (multimodal configs nest theirs)."""
    text = config.get("text_config") or config
    try:
        return ModelShape(
            architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
            layers=text["num_hidden_layers"],
            kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            hidden_size=text["hidden_size"],
            vocab_size=text["vocab_size"],
        )
    except (KeyError, TypeError, ValueError):
        return None


def shape_of_model(model: str | Path | None) -> ModelShape | None:
    """The shape of a local model folder; None for a hub name or a folder without a readable config."""
    if model is None:
        return None
    path = Path(model) / "config.json"
    try:
        return shape_of_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def foreign_model_note(
    weights_name: str, evolved_for: ModelShape | None, base_model: str | None, served: ModelShape | None
) -> str | None:
    """The log line for weights evolved on another model than the served one; None when they match
    or when either side is unknown (nothing to claim)."""
    if evolved_for is None or served is None or evolved_for == served:
        return None
    return (
        f"vllm-namm: NAMM weights {weights_name} were evolved for {base_model or 'another model'} "
        f"({evolved_for}); this server runs a different model ({served}): their eviction quality is "
        "unmeasured here (evolve weights for this model with python -m evolve)"
    )
