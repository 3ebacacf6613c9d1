"""StreamingLLM (Xiao et al. 2024): attention sinks + the most recent window."""

from __future__ import annotations

from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState, _token_rank
from vllm_namm.policies.budget import BudgetPolicy


class StreamingPolicy(BudgetPolicy):
    """Score = recency rank, with the ``budget.streaming_sinks`` oldest tokens ranked first."""

    name = "streaming"
    needs_attention = False

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        n = view.positions.shape[-1]
        rank = _token_rank(view, n, view.positions.device).float()
        return rank.masked_fill(rank < self.budget.streaming_sinks, float("inf"))
