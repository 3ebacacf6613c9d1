"""``none``: keep everything (the full-cache reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_namm.policies.base import EvictionPolicy, LayerView, PolicyState


class NoEviction(EvictionPolicy):
    name = "none"
    evicts = False
    needs_attention = False

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        return torch.zeros(view.positions.shape, device=view.positions.device)

    def select(self, scores: Tensor, view: LayerView) -> Tensor:
        return torch.ones_like(scores, dtype=torch.bool)
