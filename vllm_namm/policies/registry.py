"""The one list of eviction policies: name -> class. Everything else derives from it.

The flag choices (``--kv-eviction``), the config and request models (their policy names and every
policy's own knobs, :mod:`vllm_namm.config`, :mod:`vllm_namm.vllm_patch.request_settings`), which
policies need or accept a budget, and the test matrices all read this table, so adding a policy is
its own module plus one line here (docs/design.md, "Adding a policy").

Each entry names its class as ``"module:Class"`` (one line per policy); the classes are imported
right here, when the registry is. Policies sit below the config in the stack (they import
:mod:`vllm_namm.settings`, never :mod:`vllm_namm.config`), so nothing has to be loaded lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vllm_namm.policies.base import EvictionPolicy
from vllm_namm.settings import Knob, knob_of
from vllm_namm.weights import NammWeights, WeightsStore

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig

REGISTRY: Mapping[str, str] = MappingProxyType(
    {
        "none": "vllm_namm.policies.none:NoEviction",
        "namm": "vllm_namm.policies.namm:NammPolicy",
        "h2o": "vllm_namm.policies.h2o:H2OPolicy",
        "l2": "vllm_namm.policies.l2:L2Policy",
        "streaming": "vllm_namm.policies.streaming:StreamingPolicy",
        "snapkv": "vllm_namm.policies.snapkv:SnapKVPolicy",
    }
)


def _load(name: str, target: str) -> type[EvictionPolicy]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != name:
        raise TypeError(f"{target} is registered as {name!r} but names itself {cls.name!r}")
    return cls


POLICIES: Mapping[str, type[EvictionPolicy]] = MappingProxyType(
    {name: _load(name, target) for name, target in REGISTRY.items()}
)
"""Every registered policy, by name."""
POLICY_NAMES: tuple[str, ...] = tuple(REGISTRY)
OFF: str = next(name for name, cls in POLICIES.items() if not cls.evicts)
"""The policy that leaves vLLM unchanged (the default)."""


@dataclass(frozen=True)
class KnobSpec:
    """One policy's knob: the settings field ``name`` of policy ``owner`` and how users reach it."""

    name: str
    owner: str
    field: Any
    """The pydantic ``FieldInfo`` (type, default, bounds, validators)."""
    knob: Knob


def _knobs() -> Mapping[str, KnobSpec]:
    specs: dict[str, KnobSpec] = {}
    for owner, cls in POLICIES.items():
        for name, field in cls.Settings.model_fields.items():
            spec = KnobSpec(name, owner, field, knob_of(field))
            if name in specs:
                raise TypeError(
                    f"policies {specs[name].owner!r} and {owner!r} both declare the setting {name!r}"
                )
            if spec.knob.key is not None and not spec.knob.key.startswith(f"{owner}_"):
                raise TypeError(f"{owner}: per-request key {spec.knob.key!r} must start with '{owner}_'")
            if spec.knob.flag is not None and not spec.knob.flag.startswith("--"):
                raise TypeError(f"{owner}: flag {spec.knob.flag!r} must start with '--'")
            specs[name] = spec
    return MappingProxyType(specs)


KNOBS: Mapping[str, KnobSpec] = _knobs()
"""Every policy's knobs, by settings field name (unique over all policies)."""


def policy_class(name: str) -> type[EvictionPolicy]:
    """The class registered as ``name``."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; one of {', '.join(POLICY_NAMES)}")
    return POLICIES[name]


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


def make_policy(config: EvictionConfig, weights: NammWeights | WeightsStore | None = None) -> EvictionPolicy:
    """The policy ``config`` names, built by its class (:meth:`EvictionPolicy.from_config`).

    ``weights``: a store to read weights files from (one per owner, so each file loads once), or
    the weights a learnt policy must use whatever the config names; None: a fresh store."""
    store = weights if isinstance(weights, WeightsStore) else WeightsStore(weights)
    return policy_class(config.policy).from_config(config, store)
