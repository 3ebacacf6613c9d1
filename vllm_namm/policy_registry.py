"""The one list of eviction policies: name -> class. Everything else derives from it.

The flag choices (``--kv-eviction``), the config and request validation (``PolicyName``), which
policies need or accept a budget, and the test matrices all read this table, so adding a policy
is its own module plus one line here (README, "Adding a policy").

Classes are named as ``"module:Class"`` and imported on first use: :mod:`vllm_namm.config`
needs the names, and the policy modules import the config, so the table itself imports nothing.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_namm.policies.base import EvictionPolicy

REGISTRY: dict[str, str] = {
    "none": "vllm_namm.policies.none:NoEviction",
    "namm": "vllm_namm.policies.namm:NammPolicy",
    "h2o": "vllm_namm.policies.h2o:H2OPolicy",
    "l2": "vllm_namm.policies.l2:L2Policy",
    "streaming": "vllm_namm.policies.streaming:StreamingPolicy",
    "snapkv": "vllm_namm.policies.snapkv:SnapKVPolicy",
}

POLICY_NAMES: tuple[str, ...] = tuple(REGISTRY)


@functools.cache
def policy_class(name: str) -> type[EvictionPolicy]:
    """The class registered as ``name`` (its ``name`` attribute must agree)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown eviction policy {name!r}; one of {', '.join(POLICY_NAMES)}")
    module, _, attr = REGISTRY[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise TypeError(f"{REGISTRY[name]} is registered as {name!r} but names itself {cls.name!r}")
    return cls


def needs_budget(name: str) -> bool:
    """The policy only ranks: it keeps its best tokens within a budget, and needs one."""
    return policy_class(name).budget_rule == "required"


def takes_budget(name: str) -> bool:
    """The policy accepts a budget (it needs one, or can rank under one instead of its own rule)."""
    return policy_class(name).budget_rule != "none"


def budget_policies() -> list[str]:
    """Names of the policies that need a budget, sorted."""
    return sorted(n for n in POLICY_NAMES if needs_budget(n))


def budget_takers() -> list[str]:
    """Names of the policies that accept a budget, sorted."""
    return sorted(n for n in POLICY_NAMES if takes_budget(n))
