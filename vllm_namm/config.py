"""The eviction config: which policy runs, how often, how its decisions become freed pages, and
every registered policy's own knobs.

The engine's settings are declared here; each policy declares its own (``EvictionPolicy.Settings``,
e.g. NAMM's ``weights`` and ``threshold``, SnapKV's ``snapkv_window``), and :class:`EvictionConfig`
is built from both when the registry is imported, so a policy's knob is a config field without this
file naming it. Which settings go together is :mod:`vllm_namm.rules`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic import create_model as _create_model

from vllm_namm.policies.registry import KNOBS, OFF, POLICY_NAMES, budget_takers, policy_class
from vllm_namm.rules import Conflict, config_knobs, first_conflict
from vllm_namm.settings import (
    BudgetConfig,
    FeatureConfig,
    Granularity,
    Invalid,
    Kernels,
    LayerBudget,
    PageRule,
    PageScore,
    ProtectConfig,
    Selection,
    Strict,
)

PolicyName = Literal[POLICY_NAMES]  # type: ignore[valid-type]  # the registry's names


class EngineSettings(Strict):
    """The settings of the eviction machinery itself (every policy's knobs are added to it)."""

    policy: PolicyName = OFF
    interval: int = Field(512, gt=0, description="n_up: tokens between two eviction steps")
    budget: BudgetConfig | None = None
    protect: ProtectConfig = ProtectConfig()
    page_rule: PageRule = Field(
        "all",
        description="token-level selection (and namm): free a page when all / most / any of its "
        "(layer, head, token) entries are evicted",
    )
    selection: Selection = Field(
        "page",
        description="budget policies: 'page' keeps the best whole pages within the budget "
        "(page_plan.select_pages); 'token' keeps each head's best tokens, then frees pages by page_rule",
    )
    page_score: PageScore = Field(
        "max",
        description="page-level selection: a page's score from its tokens' per-head normalised "
        "ranks over every layer and KV head (max, mean, or the share the token-level budget would keep); "
        "max measured best (docs/results/2026-12-01-budgets-in-pages.md)",
    )
    kernels: Kernels = Field(
        "auto",
        description="feature/scorer kernels of the eviction step: auto = Triton on GPU, exact fast torch on "
        "CPU; reference = the slow plain-torch definitions (for checking the fast paths)",
    )
    lag: int = Field(
        2,
        ge=0,
        le=64,
        description="engine steps between a step's start and its freed pages: the decision is computed "
        "off the critical path meanwhile (0 = synchronous, inside the engine step)",
    )
    prefix_cache_mib: float = Field(
        256.0,
        ge=0.0,
        allow_inf_nan=False,
        description="eviction-aware prefix caching: MiB per worker of policy states recorded at step "
        "boundaries, so that a later request with the same prefix and settings resumes from there "
        "(0 = off: an evicting request then prefills its whole prompt)",
    )

    granularity: Granularity = Field(
        "shared",
        description="pages shared by every layer of a KV-cache group (vLLM's grouping: one group for a "
        "plain model, its full-attention groups for a hybrid one), or 'layer': every attention layer its "
        "own KV-cache group, so each layer frees its own pages (the paper's per-layer eviction; opt-in)",
    )
    layer_budget: LayerBudget = Field(
        "uniform",
        description="with granularity 'layer': how a budget is spread over the layers: the same in every "
        "layer, or a pyramid (PyramidKV: linear from 2 - 1/20 of the mean at the first layer down to 1/20 at "
        "the last, the same total)",
    )

    @field_validator("interval")
    @classmethod
    def _whole_hops(cls, v: int) -> int:
        if v % 16:
            raise ValueError("must be a multiple of 16 (the STFT hop)")
        return v

    @model_validator(mode="after")
    def _check(self) -> EngineSettings:
        given = [name for name in KNOBS if name in type(self).model_fields and self._knob_given(name)]
        budget: list[Any] = []
        if self.budget is not None:
            budget = ["tokens" if self.budget.tokens is not None else "ratio"]
        conflict = first_conflict(self.policy, budget, given)
        if conflict is not None:
            raise ValueError(config_message(conflict))
        if self.layer_budget != "uniform":
            need = "granularity 'layer' (per-layer pages)" if self.granularity != "layer" else None
            if need is None and self.selection != "page":
                need = "page-level selection (selection 'page')"
            if need is not None:
                raise Invalid(
                    "layer_budget", f"spreads a budget over the layers: needs {need}"
                ).as_validation_error(type(self).__name__, self.layer_budget)
        try:
            policy_class(self.policy).check_config(self)  # type: ignore[arg-type]
        except Invalid as e:
            raise e.as_validation_error(
                type(self).__name__, getattr(self, e.field.split(".")[0], None)
            ) from None
        return self

    def _knob_given(self, name: str) -> bool:
        return getattr(self, name) != KNOBS[name].field.default


def config_message(conflict: Conflict) -> str:
    """A :class:`~vllm_namm.rules.Conflict` in the config's words (its field names)."""
    p = conflict.policy
    if conflict.kind == "needs_budget":
        return f"policy '{p}' needs a budget (budget.tokens or budget.ratio)"
    if conflict.kind == "takes_no_budget":
        return f"policy '{p}' takes no budget (only {budget_takers()})"
    if conflict.kind == "foreign_knob":
        names = config_knobs(conflict.owner)
        verb = "apply" if len(names) > 1 else "applies"
        return f"{'/'.join(names)} only {verb} to policy '{conflict.owner}', not '{p}'"
    if conflict.kind == "knob_needs_own_rule":
        return f"{conflict.owner} under a budget keeps its best-scored tokens: a {conflict.subject} does not apply"
    return "budget: give exactly one of 'tokens' or 'ratio'"


def _knob_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, spec in KNOBS.items():
        if name in EngineSettings.model_fields:
            raise TypeError(f"policy {spec.owner!r} declares {name!r}, a setting of the engine")
        if not spec.knob.request_only:
            fields[name] = (spec.field.annotation, spec.field)
    return fields


EvictionConfig = _create_model(
    "EvictionConfig", __base__=EngineSettings, __module__=__name__, **_knob_fields()
)
EvictionConfig.__doc__ = """Which policy runs, how often, how its token decisions are applied, and every registered
policy's own knobs (fields its ``Settings`` declares, e.g. NAMM's ``weights`` and ``threshold``)."""

__all__ = [
    "BudgetConfig",
    "EngineSettings",
    "EvictionConfig",
    "FeatureConfig",
    "PageRule",
    "PageScore",
    "PolicyName",
    "ProtectConfig",
    "Selection",
    "config_message",
]
