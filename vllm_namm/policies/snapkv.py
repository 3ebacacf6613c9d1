"""SnapKV (Li et al. 2024): attention of an observation window of the latest queries, pooled."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState
from vllm_namm.policies.budget import BudgetPolicy


class SnapKVPolicy(BudgetPolicy):
    """Score = max-pool (kernel ``snapkv_kernel``) of the attention summed over the last
    ``snapkv_window`` queries; tokens inside the observation window are always kept (SnapKV
    keeps the window itself)."""

    name = "snapkv"

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        assert view.attn is not None
        w = min(self.budget.snapkv_window, view.attn.shape[1])
        votes = torch.nan_to_num(view.attn[:, -w:, :].float(), nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1)
        k = self.budget.snapkv_kernel
        pooled = F.max_pool1d(votes.unsqueeze(1), kernel_size=k, stride=1, padding=k // 2).squeeze(1)
        if w > 0:
            in_window = view.positions >= view.query_positions[-w]
            # finite, so protected tokens (+inf in BudgetPolicy.select) still rank first
            pooled = pooled.masked_fill(in_window, torch.finfo(torch.float32).max)
        return pooled
