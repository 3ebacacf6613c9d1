"""H2O (Zhang et al. 2023): keep the heavy hitters, tokens with the most accumulated attention."""

from __future__ import annotations

import torch
from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState, filter_tokens
from vllm_namm.policies.budget import BudgetPolicy


class H2OState(PolicyState):
    """Accumulated attention [kv_heads, n_tokens] over every query seen since a token was cached."""

    def __init__(self) -> None:
        self.acc: Tensor | None = None

    def filter(self, keep: Tensor) -> None:
        if self.acc is not None:
            self.acc = filter_tokens(self.acc.unsqueeze(-1), keep).squeeze(-1)


class H2OPolicy(BudgetPolicy):
    name = "h2o"
    attention_sums = True

    def new_state(self, params: Tensor | None = None) -> H2OState:
        super().new_state(params)  # rejects a parameter vector
        return H2OState()

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        assert isinstance(state, H2OState)
        if view.attn_sums is not None:  # the engine's sums (finite: else it gives the matrix)
            step = view.attn_sums.float()
        else:
            assert view.attn is not None
            # non-finite attention rows add nothing rather than poisoning the sums
            step = torch.nan_to_num(view.attn.float(), nan=0.0, posinf=0.0, neginf=0.0).sum(dim=1)
        kv_heads, n = step.shape
        acc = state.acc if state.acc is not None else step.new_zeros(kv_heads, 0, dtype=torch.float32)
        acc = torch.cat([acc, acc.new_zeros(kv_heads, view.num_new_tokens)], dim=1)
        if acc.shape[1] != n:
            raise ValueError(f"H2O state tracks {acc.shape[1]} tokens, attention covers {n}")
        state.acc = acc + step
        return state.acc.clone()
