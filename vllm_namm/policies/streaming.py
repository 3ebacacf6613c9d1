"""StreamingLLM (Xiao et al. 2024): attention sinks + the most recent window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState, _token_rank
from vllm_namm.policies.budget import BudgetPolicy
from vllm_namm.settings import BudgetConfig, Invalid, PolicySettings, ProtectConfig

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig
    from vllm_namm.weights import WeightsStore


class StreamingSettings(PolicySettings):
    streaming_sinks: int = Field(4, ge=0, description="StreamingLLM attention-sink tokens")


class StreamingPolicy(BudgetPolicy):
    """Score = recency rank, with the ``sinks`` oldest tokens ranked first."""

    name = "streaming"
    Settings = StreamingSettings
    needs_attention = False

    def __init__(self, budget: BudgetConfig, protect: ProtectConfig | None = None, sinks: int = 4) -> None:
        super().__init__(budget, protect)
        self.sinks = sinks

    @classmethod
    def from_config(cls, config: EvictionConfig, weights: WeightsStore) -> StreamingPolicy:
        assert config.budget is not None
        return cls(config.budget, config.protect, sinks=config.streaming_sinks)

    @classmethod
    def check_config(cls, config: EvictionConfig) -> None:
        tokens = config.budget.tokens if config.budget is not None else None
        if tokens is not None and tokens <= config.streaming_sinks:
            raise Invalid(
                "budget", f"budget tokens ({tokens}) must exceed streaming_sinks ({config.streaming_sinks})"
            )

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        n = view.positions.shape[-1]
        rank = _token_rank(view, n, view.positions.device).float()
        return rank.masked_fill(rank < self.sinks, float("inf"))
