"""``namm``: the evolved Neural Attention Memory Model (paper §3, DESIGN.md §1).

score: attention spectrogram EMA (state) -> normalise -> + oldness -> BAM/MLP;
select: keep ``score >= threshold`` (0 by default), i.e. evict exactly the tokens scoring
below it (the paper's rule). Under a budget (ours) NAMM instead *ranks*: like the budget
baselines it keeps its best-scored tokens, or whole pages (page-level selection), within the
budget: an operator gets a memory guarantee, and evolution compares candidates at equal memory
instead of chasing retention. NaN/inf attention or scores keep the token.
"""

from __future__ import annotations

import torch
from torch import Tensor

import vllm_namm.features as feats  # module import: features imports policies.base (cycle-safe)
from vllm_namm.config import BudgetConfig, ProtectConfig
from vllm_namm.kernels import Backend
from vllm_namm.policies.base import EvictionPolicy, LayerView, PolicyState, sanitize_scores
from vllm_namm.policies.budget import keep_within_budget
from vllm_namm.scorers import score_ragged
from vllm_namm.weights import NammWeights


class NammPolicy(EvictionPolicy):
    """NAMM with one shared scorer for every layer and KV head (evo-memory ``per_layer: false,
    per_head: false``).

    A request may bring its own flat parameter vector (``new_state(params=...)``): evolution
    evaluates a whole CMA-ES population in one batch that way.
    """

    name = "namm"
    accepts_paged_features = True

    def __init__(self, weights: NammWeights, threshold: float | None = None, kernels: Backend = "auto",
                 budget: BudgetConfig | None = None, protect: ProtectConfig | None = None) -> None:
        self.weights = weights
        self.features = weights.features
        self.scorer = weights.build_scorer()
        self.threshold = weights.threshold if threshold is None else threshold
        self.norm_mean = weights.norm_mean
        self.norm_std = weights.norm_std
        self.kernels = kernels
        self.budget = budget
        """None: the threshold rule; else rank under this budget."""
        self.protect_cfg = protect or ProtectConfig()

    @property
    def num_params(self) -> int:
        return self.scorer.num_params

    def new_state(self, params: Tensor | None = None) -> feats.NammFeatureState:
        if params is not None:
            params = torch.as_tensor(params, dtype=torch.float32).flatten()
            if params.numel() != self.num_params:
                raise ValueError(
                    f"candidate parameter vector has {params.numel()} values, the "
                    f"{self.weights.scorer.kind} scorer needs {self.num_params}"
                )
        return feats.NammFeatureState(self.features, params)

    def features_for(self, view: LayerView, state: feats.NammFeatureState) -> tuple[Tensor, Tensor]:
        """Scorer input [kv, n, 25] and the bad-token mask [kv, n]; updates ``state``."""
        if view.attn is None and view.paged_features is None:
            raise ValueError("namm needs the attention of the latest queries (view.attn is None)")
        ema, bad = feats.spectral_features(
            view.attn, view.positions, view.query_positions, view.num_new_tokens, state,
            paged=view.paged_features, backend=self.kernels,
        )
        newest = view.query_positions.max() if view.query_positions.numel() else view.positions.max()
        x = feats.token_features(ema, view.positions, newest, self.features, self.norm_mean, self.norm_std)
        return x.masked_fill(bad.unsqueeze(-1), 0.0), bad

    @torch.no_grad()
    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        return self.score_prepared([self.prepare(view, state)])[0]

    @torch.no_grad()
    def prepare(self, view: LayerView, state: PolicyState) -> tuple[Tensor, Tensor, Tensor | None]:
        """This layer's scorer input, bad-token mask and candidate vector (updates the EMA state)."""
        assert isinstance(state, feats.NammFeatureState)
        x, bad = self.features_for(view, state)
        return x, bad, state.params

    @torch.no_grad()
    def score_prepared(self, prepared: list[tuple[Tensor, Tensor, Tensor | None]]) -> list[Tensor]:
        """ONE scorer call for every (request, layer, KV head) of the step (ragged, left-padded)."""
        if not prepared:
            return []
        device = prepared[0][0].device
        if self.scorer.flat.device != device:
            self.scorer.to(device)
        xs = [x for x, _, _ in prepared]
        flats = [None if f is None else f.to(device) for _, _, f in prepared]
        if self.kernels == "reference":  # the slow definition, one entry at a time (for checking)
            scores = [self.scorer.forward_reference(x, f) for x, f in zip(xs, flats, strict=True)]
        else:
            scores = score_ragged(self.scorer, xs, flats)
        return [s.masked_fill(bad, float("inf")) for s, (_, bad, _) in zip(scores, prepared, strict=True)]

    def select(self, scores: Tensor, view: LayerView) -> Tensor:
        if self.budget is not None:
            return keep_within_budget(scores, view, self.budget, self.protect_cfg)
        return sanitize_scores(scores) >= self.threshold
