"""Shared base of the fixed-budget baselines (h2o, l2, streaming, snapkv)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from vllm_namm.policies.base import EvictionPolicy, LayerView, protected_mask, topk_keep
from vllm_namm.settings import BudgetConfig, ProtectConfig

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig
    from vllm_namm.weights import WeightsStore


class BudgetPolicy(EvictionPolicy):
    """Keep exactly ``budget.size(n_tokens)`` tokens per KV head, the best-scored ones.

    Protected tokens count inside the budget (they are ranked first), so after
    :func:`~vllm_namm.policies.base.protect` the cache still holds exactly the budget
    whenever the budget is at least the number of protected tokens.

    This is token-level selection (``EvictionConfig.selection == "token"``, and the reference
    runner's per-head rule). Under page-level selection, the default, the paged engine and the
    reference runner use only ``score()`` and ``budget``: whole pages are ranked and kept by
    :func:`vllm_namm.page_plan.select_pages`, and ``select()`` only feeds the page-rounding
    statistics.
    """

    budget_rule = "required"
    budget: BudgetConfig

    def __init__(self, budget: BudgetConfig, protect: ProtectConfig | None = None) -> None:
        self.budget = budget
        self.protect_cfg = protect or ProtectConfig()

    @classmethod
    def from_config(cls, config: EvictionConfig, weights: WeightsStore) -> BudgetPolicy:
        assert config.budget is not None  # EvictionConfig refuses a budget policy without one
        return cls(config.budget, config.protect)

    def select(self, scores: Tensor, view: LayerView) -> Tensor:
        return keep_within_budget(scores, view, self.budget, self.protect_cfg)


def keep_within_budget(
    scores: Tensor, view: LayerView, budget: BudgetConfig, protect: ProtectConfig
) -> Tensor:
    """Each KV head's ``budget.size`` best-scored tokens, protected tokens ranked first (token level)."""
    prot = protected_mask(view, protect)
    ranked = scores.float().masked_fill(prot, float("inf"))
    context = int(view.positions.max()) + 1 if view.positions.numel() else 0
    return topk_keep(ranked, budget.size(scores.shape[-1], context))
