"""Where the registry used to live; it is :mod:`vllm_namm.policies.registry` now (kept for imports)."""

from vllm_namm.policies.registry import (
    POLICIES,
    POLICY_NAMES,
    REGISTRY,
    budget_policies,
    budget_takers,
    make_policy,
    needs_budget,
    policy_class,
    takes_budget,
)

__all__ = [
    "POLICIES",
    "POLICY_NAMES",
    "REGISTRY",
    "budget_policies",
    "budget_takers",
    "make_policy",
    "needs_budget",
    "policy_class",
    "takes_budget",
]
