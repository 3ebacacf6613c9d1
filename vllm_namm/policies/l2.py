"""Key-norm eviction (Devoto et al. 2024): a *low* L2 key norm marks an important token."""

from __future__ import annotations

from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState
from vllm_namm.policies.budget import BudgetPolicy


class L2Policy(BudgetPolicy):
    name = "l2"
    needs_attention = False
    needs_keys = True

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        assert view.keys is not None
        return -view.keys.float().norm(dim=-1)
