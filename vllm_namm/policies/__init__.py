"""Eviction policies, by name (the list itself: :mod:`vllm_namm.policy_registry`).

``make_policy(config)`` is what the engine and the reference runner call; the NAMM weights
default to the shipped evolved weights (:mod:`vllm_namm.shipped_weights`).
"""

from __future__ import annotations

from vllm_namm.config import BudgetConfig, EvictionConfig
from vllm_namm.policies.base import (
    EvictionPolicy,
    LayerView,
    PolicyState,
    equalize_head_drops,
    filter_tokens,
    protect,
    protected_mask,
    sanitize_scores,
    topk_keep,
)
from vllm_namm.policies.budget import BudgetPolicy
from vllm_namm.policies.h2o import H2OPolicy
from vllm_namm.policies.l2 import L2Policy
from vllm_namm.policies.namm import NammPolicy
from vllm_namm.policies.none import NoEviction
from vllm_namm.policies.snapkv import SnapKVPolicy
from vllm_namm.policies.streaming import StreamingPolicy
from vllm_namm.policy_registry import POLICY_NAMES, policy_class
from vllm_namm.shipped_weights import DEFAULT_WEIGHTS, HAND_WEIGHTS
from vllm_namm.weights import NammWeights, load_weights

POLICIES: dict[str, type[EvictionPolicy]] = {name: policy_class(name) for name in POLICY_NAMES}
"""Every registered policy (:mod:`vllm_namm.policy_registry`), by name."""


def namm_budget(config: EvictionConfig, weights: NammWeights) -> BudgetConfig | None:
    """The budget NAMM ranks under: the config's; else, unless a threshold is asked for, the one the
    weights were evolved at (``budget_ratio`` in the file); None = the threshold rule."""
    if config.budget is not None or config.threshold is not None or weights.budget_ratio is None:
        return config.budget
    return BudgetConfig(ratio=weights.budget_ratio)


def make_policy(config: EvictionConfig, weights: NammWeights | None = None) -> EvictionPolicy:
    """The policy ``config`` names. For ``namm``: ``weights`` if given, else ``config.weights``,
    else the shipped default; ``config.threshold`` overrides the file's threshold."""
    cls = POLICIES[config.policy]
    if cls is NammPolicy:
        if weights is None:
            weights = load_weights(config.weights or DEFAULT_WEIGHTS)
        if config.interval % weights.features.s_w:
            raise ValueError(
                f"interval {config.interval} is not a multiple of the weights' STFT hop {weights.features.s_w}"
            )
        return NammPolicy(
            weights,
            threshold=config.threshold,
            kernels=config.kernels,
            budget=namm_budget(config, weights),
            protect=config.protect,
        )
    if issubclass(cls, BudgetPolicy):
        assert config.budget is not None
        return cls(config.budget, config.protect)
    return cls()


__all__ = [
    "DEFAULT_WEIGHTS",
    "HAND_WEIGHTS",
    "POLICIES",
    "BudgetPolicy",
    "EvictionPolicy",
    "H2OPolicy",
    "L2Policy",
    "LayerView",
    "NammPolicy",
    "NoEviction",
    "PolicyState",
    "SnapKVPolicy",
    "StreamingPolicy",
    "equalize_head_drops",
    "filter_tokens",
    "make_policy",
    "namm_budget",
    "protect",
    "protected_mask",
    "sanitize_scores",
    "topk_keep",
]
