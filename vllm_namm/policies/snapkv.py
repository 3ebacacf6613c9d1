"""SnapKV (Li et al. 2024): attention of an observation window of the latest queries, pooled."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, Field
from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState
from vllm_namm.policies.budget import BudgetPolicy
from vllm_namm.settings import BudgetConfig, PolicySettings, ProtectConfig

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig
    from vllm_namm.weights import WeightsStore


def _odd(kernel: int) -> int:
    if kernel % 2 == 0:
        raise ValueError(f"snapkv_kernel must be odd, got {kernel}")
    return kernel


class SnapKVSettings(PolicySettings):
    snapkv_window: int = Field(32, gt=0, description="SnapKV observation window (latest queries)")
    snapkv_kernel: Annotated[int, AfterValidator(_odd)] = Field(
        7, gt=0, description="SnapKV max-pool kernel (odd)"
    )


class SnapKVPolicy(BudgetPolicy):
    """Score = max-pool (kernel ``kernel``) of the attention summed over the last ``window``
    queries; tokens inside the observation window are always kept (SnapKV keeps the window itself)."""

    name = "snapkv"
    Settings = SnapKVSettings

    def __init__(
        self, budget: BudgetConfig, protect: ProtectConfig | None = None, window: int = 32, kernel: int = 7
    ) -> None:
        super().__init__(budget, protect)
        self.window = window
        self.attention_window = window  # the engine computes only these rows
        self.kernel = _odd(kernel)

    @classmethod
    def from_config(cls, config: EvictionConfig, weights: WeightsStore) -> SnapKVPolicy:
        assert config.budget is not None
        return cls(config.budget, config.protect, window=config.snapkv_window, kernel=config.snapkv_kernel)

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        assert view.attn is not None
        w = min(self.window, view.attn.shape[1])
        votes = torch.nan_to_num(view.attn[:, -w:, :].float(), nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1)
        k = self.kernel
        pooled = F.max_pool1d(votes.unsqueeze(1), kernel_size=k, stride=1, padding=k // 2).squeeze(1)
        if w > 0:
            in_window = view.positions >= view.query_positions[-w]
            # finite, so protected tokens (+inf in BudgetPolicy.select) still rank first
            pooled = pooled.masked_fill(in_window, torch.finfo(torch.float32).max)
        return pooled
