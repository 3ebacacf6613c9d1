"""Which eviction settings go together: the budget and policy-knob rules, written once.

Four front ends check them, each in its own words: the ``vllm serve`` flags
(:mod:`vllm_namm.vllm_patch.cli`), the config model (:class:`vllm_namm.config.EvictionConfig`), a
request's ``vllm_xargs`` (:mod:`vllm_namm.vllm_patch.request_settings`) and, through the last one,
the API server's per-request validation. Each describes what it was given (the policy, the budget
settings, the policies' knobs) and words the :class:`Conflict` this module finds; the rules and
their order live only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from vllm_namm.policies.registry import KNOBS, policy_class

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig

ConflictKind = Literal[
    "both_budgets", "needs_budget", "takes_no_budget", "foreign_knob", "knob_needs_own_rule"
]
BudgetSetting = Literal["tokens", "ratio"]


@dataclass(frozen=True)
class Conflict:
    """The first rule a set of settings breaks.

    * ``both_budgets``: a budget in tokens and one as a ratio (``subject``: the first given);
    * ``needs_budget``: the policy only ranks, and no budget applies;
    * ``takes_no_budget``: a budget (``subject``) for a policy that refuses one;
    * ``foreign_knob``: the knob ``subject`` belongs to policy ``owner``, not to the one that runs;
    * ``knob_needs_own_rule``: the knob ``subject`` belongs to its policy's own rule, which a budget
      (``budget``: the setting given, "" when the server's applies) replaces.
    """

    kind: ConflictKind
    policy: str
    subject: str = ""
    owner: str = ""
    budget: str = ""


def first_conflict(
    policy: str,
    budget: Sequence[BudgetSetting] = (),
    knobs: Sequence[str] = (),
    inherited_budget: bool = False,
) -> Conflict | None:
    """The first rule broken by running ``policy`` with the budget settings ``budget`` (those given,
    in order) and the knobs ``knobs`` (settings field names of :data:`~vllm_namm.policies.registry.KNOBS`,
    those given, in order); ``inherited_budget``: a budget applies without being given (the server's)."""
    cls = policy_class(policy)
    if len(budget) > 1:
        return Conflict("both_budgets", policy, budget[0])
    has_budget = bool(budget) or inherited_budget
    if cls.budget_rule == "required" and not has_budget:
        return Conflict("needs_budget", policy)
    if cls.budget_rule == "none" and budget:
        return Conflict("takes_no_budget", policy, budget[0])
    for name in knobs:
        if KNOBS[name].owner != policy:
            return Conflict("foreign_knob", policy, name, KNOBS[name].owner)
    for name in knobs:
        if KNOBS[name].knob.own_rule and has_budget:
            return Conflict("knob_needs_own_rule", policy, name, policy, budget[0] if budget else "")
    return None


def inherits_budget(policy: str, server: EvictionConfig) -> bool:
    """Whether a request that runs ``policy`` without a budget of its own ranks under ``server``'s:
    a policy that needs a budget takes the server's; one with a rule of its own (NAMM) only when the
    server runs it too, so asking for it on a baseline's server gets its own rule."""
    cls = policy_class(policy)
    if server.budget is None or cls.budget_rule == "none":
        return False
    return cls.budget_rule == "required" or policy == server.policy


def config_knobs(owner: str) -> list[str]:
    """The knobs of policy ``owner`` that are config fields (not per-request only), in order."""
    return [name for name, spec in KNOBS.items() if spec.owner == owner and not spec.knob.request_only]
