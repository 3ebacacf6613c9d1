"""Eviction policies, by name (the list itself: :mod:`vllm_namm.policies.registry`).

``make_policy(config)`` is what the engine and the reference runner call; the NAMM weights
default to the shipped evolved weights (:mod:`vllm_namm.shipped_weights`).
"""

from __future__ import annotations

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
from vllm_namm.policies.namm import NammPolicy, namm_budget
from vllm_namm.policies.none import NoEviction
from vllm_namm.policies.registry import POLICIES, POLICY_NAMES, make_policy, policy_class
from vllm_namm.policies.snapkv import SnapKVPolicy
from vllm_namm.policies.streaming import StreamingPolicy
from vllm_namm.shipped_weights import DEFAULT_WEIGHTS, HAND_WEIGHTS

__all__ = [
    "DEFAULT_WEIGHTS",
    "HAND_WEIGHTS",
    "POLICIES",
    "POLICY_NAMES",
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
    "policy_class",
    "protect",
    "protected_mask",
    "sanitize_scores",
    "topk_keep",
]
