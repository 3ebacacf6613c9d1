"""``namm``: the evolved Neural Attention Memory Model (paper §3, ``docs/design.md`` §1).

score: attention spectrogram EMA (state) -> normalise -> + oldness -> BAM/MLP;
select: keep ``score >= threshold`` (0 by default), i.e. evict exactly the tokens scoring
below it (the paper's rule). Under a budget (ours) NAMM instead *ranks*: like the budget
baselines it keeps its best-scored tokens, or whole pages (page-level selection), within the
budget: an operator gets a memory guarantee, and evolution compares candidates at equal memory
instead of chasing retention. NaN/inf attention or scores keep the token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
from pydantic import AfterValidator, BeforeValidator, Field
from torch import Tensor

from vllm_namm import kernels
from vllm_namm.features import token_features
from vllm_namm.kernels import Backend, triton_stft_supported
from vllm_namm.policies.base import EvictionPolicy, LayerView, PolicyState, filter_tokens, sanitize_scores
from vllm_namm.policies.budget import keep_within_budget
from vllm_namm.scorers import score_ragged
from vllm_namm.settings import BudgetConfig, FeatureConfig, Knob, PolicySettings, ProtectConfig
from vllm_namm.shipped_weights import SHIPPED_WEIGHTS, resolve_weights
from vllm_namm.weights import NammWeights, WeightsStore

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig


def _shipped_name(v: object) -> object:
    return resolve_weights(v) if isinstance(v, (str, Path)) else v


def _finite(v: tuple[float, ...] | None) -> tuple[float, ...] | None:
    if v is not None and not all(math.isfinite(x) for x in v):
        raise ValueError("namm_params contains NaN or inf")
    return v


class NammSettings(PolicySettings):
    """NAMM's knobs: the weights file and the keep threshold (server-wide), and per request a
    candidate's parameter vector and EMA coefficient (evolution searches both; gamma is the paper's
    App. D fix for needle retrieval)."""

    weights: Annotated[
        Path | None,
        BeforeValidator(_shipped_name),
        Knob(
            flag="--namm-weights",
            metavar="PATH|NAME",
            help="NAMM weights (.safetensors), or a shipped name (default: the first made for the served model's "
            "shape, else 'evolved'): 'evolved' (evolved for our "
            "namm-tiny-llama from the L2 ranking, reads the key norm), 'evolved-attn' (evolved, attention "
            "features only), 'evolved-kn' (evolved, every layer free), 'l2-smollm2' (for SmolLM2-135M-Instruct: the "
            "L2 ranking as a NAMM, mean pages, 0.25 budget; loaded by default on SmolLM2), 'evolved-smollm2' (its "
            "output layer evolved against the offline proxy) or 'hand' (the hand-set starting point).",
        ),
    ] = Field(
        None,
        description=f"NAMM weights file or shipped name ({', '.join(SHIPPED_WEIGHTS)}); "
        "None = the shipped weights made for the served model, else evolved",
    )
    params: Annotated[
        tuple[float, ...] | None, AfterValidator(_finite), Knob(key="namm_params", request_only=True)
    ] = Field(None, description="one request's own scorer parameter vector (an evolution candidate)")
    threshold: Annotated[
        float | None,
        Knob(
            flag="--namm-threshold",
            key="namm_threshold",
            own_rule=True,
            help="Keep tokens whose NAMM score is >= this (default: the weights file's, 0).",
        ),
    ] = Field(
        None,
        allow_inf_nan=False,
        description="NAMM keep threshold (keep score >= threshold); None = the weights file's "
        "(NaN would evict every unprotected token: score >= nan is always false)",
    )
    ema_coeff_per_step: Annotated[float | None, Knob(key="namm_ema_coeff_per_step", request_only=True)] = (
        Field(
            None, gt=0.0, lt=1.0, allow_inf_nan=False, description="one request's EMA coefficient per query"
        )
    )


PagedFeatures = Callable[[Tensor, Tensor, Tensor, FeatureConfig], tuple[Tensor, Tensor]]
"""(prev_pad, prev_ema, first_frame, features) -> (ema, pad), computed from the paged cache with the
window, hop and EMA discount of ``features``."""


class NammFeatureState(PolicyState):
    """Per-request, per-layer memory of the feature pipeline.

    ``ema`` [kv_heads, n_tokens, bins]: the EMA'd (unnormalised) spectrogram of every cached
    token; ``pad`` [kv_heads, n_tokens, n_w - s_w]: the token's last attention values, the
    left padding of its next STFT. ``params`` optionally overrides the scorer's flat parameter
    vector for this request (evolution sends one candidate per request).
    """

    def __init__(self, cfg: FeatureConfig, params: Tensor | None = None) -> None:
        self.cfg = cfg
        self.ema: Tensor | None = None
        self.pad: Tensor | None = None
        self.params = params

    @property
    def num_tokens(self) -> int:
        return 0 if self.ema is None else self.ema.shape[1]

    def extend(self, kv_heads: int, num_new: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """State for the tokens of this step: carried values, zeros for the ``num_new`` newcomers."""
        cfg = self.cfg
        if self.ema is None:
            self.ema = torch.zeros(kv_heads, 0, cfg.bins, device=device)
            self.pad = torch.zeros(kv_heads, 0, cfg.pad, device=device)
        assert self.pad is not None
        if self.ema.shape[0] != kv_heads:
            raise ValueError(f"state has {self.ema.shape[0]} KV heads, view has {kv_heads}")
        ema = torch.cat([self.ema, self.ema.new_zeros(kv_heads, num_new, cfg.bins)], dim=1)
        pad = torch.cat([self.pad, self.pad.new_zeros(kv_heads, num_new, cfg.pad)], dim=1)
        return ema, pad

    def filter(self, keep: Tensor) -> None:
        if self.ema is None:
            return
        assert self.pad is not None
        self.ema = filter_tokens(self.ema, keep)
        self.pad = filter_tokens(self.pad, keep)


def spectral_features(
    attn: Tensor | None,
    positions: Tensor,
    query_positions: Tensor,
    num_new_tokens: int,
    state: NammFeatureState,
    paged: PagedFeatures | None = None,
    backend: kernels.Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """Update ``state`` with this step's attention; return (ema [kv, n, bins], bad [kv, n]).

    The STFT + EMA runs in :mod:`vllm_namm.kernels` (an exact matmul form on CPU, Triton on
    GPU); with ``attn`` None, ``paged`` computes it straight from the paged cache (the fused
    GPU kernel, which never materialises the attention columns).

    ``bad`` flags tokens whose new frames are not finite (NaN/inf attention): their EMA state
    keeps the decayed previous value and their returned features are NaN, so the policy can
    keep them instead of letting one broken step poison or evict them.
    """
    cfg = state.cfg
    kv_heads, n_tokens = positions.shape
    device = positions.device
    prev_ema, prev_pad = state.extend(kv_heads, num_new_tokens, device)
    if prev_ema.shape[1] != n_tokens:
        raise ValueError(
            f"state tracks {state.num_tokens} tokens + {num_new_tokens} new, but attention covers "
            f"{n_tokens}: the state was not filtered with the cache"
        )
    shared = positions.stride(0) == 0 or kv_heads == 1  # one token set for every head (the engine)
    first = kernels.first_valid_frame(positions[0] if shared else positions, query_positions, cfg.s_w)
    if attn is not None:
        ema, new_pad = kernels.spectrogram_ema(
            attn, prev_pad, prev_ema, first, cfg.gamma, backend, cfg.n_w, cfg.s_w
        )
    elif paged is not None:
        ema, new_pad = paged(prev_pad, prev_ema, first, cfg)
    else:
        raise ValueError("spectral features need the attention columns or a paged feature source")
    n_frames = query_positions.numel() // cfg.s_w
    bad = ~torch.isfinite(ema).all(dim=-1)
    if bool(bad.any()):
        state.ema = torch.where(bad.unsqueeze(-1), prev_ema * cfg.gamma**n_frames, ema)
        state.pad = torch.where(bad.unsqueeze(-1), torch.zeros_like(new_pad), new_pad)
        return ema.masked_fill(bad.unsqueeze(-1), float("nan")), bad
    state.ema, state.pad = ema, new_pad
    return ema, bad


class NammPolicy(EvictionPolicy):
    """NAMM with one shared scorer for every layer and KV head (evo-memory ``per_layer: false,
    per_head: false``).

    A request may bring its own flat parameter vector (``new_state(params=...)``): evolution
    evaluates a whole CMA-ES population in one batch that way.
    """

    name = "namm"
    Settings = NammSettings
    budget_rule = "optional"

    def __init__(
        self,
        weights: NammWeights,
        threshold: float | None = None,
        kernels: Backend = "auto",
        budget: BudgetConfig | None = None,
        protect: ProtectConfig | None = None,
    ) -> None:
        self.weights = weights
        self.features = weights.features
        self.scorer = weights.build_scorer()
        self.threshold = weights.threshold if threshold is None else threshold
        self.norm_mean = weights.norm_mean
        self.norm_std = weights.norm_std
        self.kernels = kernels
        self.budget = budget
        """None: the threshold rule; else rank under this budget."""
        self.page_score = weights.page_score
        self.protect_cfg = protect or ProtectConfig()
        self.needs_keys = self.features.key_norm  # type: ignore[misc]  # per weights file
        self.hop = self.features.s_w
        # the fused paged STFT+EMA kernel (GPU) is written for window 32 / hop 16 only
        self.accepts_paged_features = triton_stft_supported(self.features.n_w, self.hop)  # type: ignore[misc]

    @classmethod
    def from_config(cls, config: EvictionConfig, weights: WeightsStore) -> NammPolicy:
        """``config.weights`` (else the shipped default) from ``weights``; ``config.threshold`` overrides
        the file's; without a budget or a threshold, the budget the weights were evolved at."""
        w = weights.get(config.weights)
        if config.interval % w.features.s_w:
            raise ValueError(
                f"interval {config.interval} is not a multiple of the weights' STFT hop {w.features.s_w}"
            )
        return cls(
            w,
            threshold=config.threshold,
            kernels=config.kernels,
            budget=namm_budget(config, w),
            protect=config.protect,
        )

    @property
    def num_params(self) -> int:
        return self.scorer.num_params

    def new_state(
        self, params: Tensor | None = None, ema_coeff_per_step: float | None = None
    ) -> NammFeatureState:
        """``params``: a candidate's own scorer vector; ``ema_coeff_per_step``: its own EMA coefficient
        (the state's features carry it: only the spectrogram EMA reads gamma)."""
        if params is not None:
            params = torch.as_tensor(params, dtype=torch.float32).flatten()
            if params.numel() != self.num_params:
                raise ValueError(
                    f"candidate parameter vector has {params.numel()} values, the "
                    f"{self.weights.scorer.kind} scorer needs {self.num_params}"
                )
        features = self.features
        if ema_coeff_per_step is not None:
            features = features.model_copy(update={"ema_coeff_per_step": ema_coeff_per_step})
        return NammFeatureState(features, params)

    def features_for(self, view: LayerView, state: NammFeatureState) -> tuple[Tensor, Tensor]:
        """Scorer input [kv, n, input_dim] and the bad-token mask [kv, n]; updates ``state``."""
        if view.attn is None and view.paged_features is None:
            raise ValueError("namm needs the attention of the latest queries (view.attn is None)")
        if self.features.key_norm and view.keys is None:
            raise ValueError("these NAMM weights score the key norm: the view must carry the keys")
        ema, bad = spectral_features(
            view.attn,
            view.positions,
            view.query_positions,
            view.num_new_tokens,
            state,
            paged=view.paged_features,
            backend=self.kernels,
        )
        newest = view.query_positions.max() if view.query_positions.numel() else view.positions.max()
        key_norm = view.keys.float().norm(dim=-1) if self.features.key_norm else None
        x = token_features(
            ema, view.positions, newest, self.features, self.norm_mean, self.norm_std, key_norm
        )
        return x.masked_fill(bad.unsqueeze(-1), 0.0), bad

    @torch.no_grad()
    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        return self.score_prepared([self.prepare(view, state)])[0]

    @torch.no_grad()
    def prepare(self, view: LayerView, state: PolicyState) -> tuple[Tensor, Tensor, Tensor | None]:
        """This layer's scorer input, bad-token mask and candidate vector (updates the EMA state)."""
        assert isinstance(state, NammFeatureState)
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


def namm_budget(config: EvictionConfig, weights: NammWeights) -> BudgetConfig | None:
    """The budget NAMM ranks under: the config's; else, unless a threshold is asked for, the one the
    weights were evolved at (``budget_ratio`` in the file); None = the threshold rule."""
    if config.budget is not None or config.threshold is not None or weights.budget_ratio is None:
        return config.budget
    return BudgetConfig(ratio=weights.budget_ratio)
