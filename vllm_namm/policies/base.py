"""The eviction-policy interface shared by the reference runner and the vLLM engine.

A policy sees one layer of one request at a time (:class:`LayerView`), keeps whatever
per-token memory it needs in its own :class:`PolicyState`, and answers with token-level
scores and a keep mask. Who applies the mask (per-head in the reference runner,
page-granular in vLLM) is not the policy's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

from vllm_namm.settings import BudgetConfig, PageScore, PolicySettings, ProtectConfig

if TYPE_CHECKING:
    from vllm_namm.config import EvictionConfig
    from vllm_namm.weights import WeightsStore

BudgetRule = Literal["none", "required", "optional"]


@dataclass
class LayerView:
    """What a policy may look at for one layer of one request at one eviction step.

    Token axes are aligned: index ``i`` of every per-token tensor is the same cached
    token. Tokens are ordered oldest first; tokens cached since the previous step are
    the last ``num_new_tokens`` entries.
    """

    attn: Tensor | None
    """[kv_heads, n_queries, n_tokens] softmax attention of the latest queries (oldest query
    first) to every cached token, averaged over the query heads sharing a KV head; exactly 0
    where the causal mask hides the key. ``None`` when the policy does not need it. The engine
    may give only the newest :attr:`EvictionPolicy.attention_window` rows, or only
    :attr:`attn_sums` (:attr:`EvictionPolicy.attention_sums`)."""
    keys: Tensor | None
    """[kv_heads, n_tokens, head_dim] cached keys (post-RoPE). ``None`` unless needed."""
    positions: Tensor
    """[kv_heads, n_tokens] int64 logical positions of the cached tokens (per head, because the
    reference runner lets heads keep different tokens)."""
    query_positions: Tensor
    """[n_queries] int64 logical positions of the queries in ``attn``."""
    num_new_tokens: int
    """How many trailing tokens entered the cache since this state's previous step."""
    attn_sums: Tensor | None = None
    """[kv_heads, n_tokens] ``attn`` summed over the queries, given *instead of* ``attn`` to policies
    that read only that (:attr:`EvictionPolicy.attention_sums`): the engine never writes the matrix."""
    paged_features: Any = None
    """Engine on GPU: ``(prev_pad, prev_ema, first_frame, features) -> (ema, pad)`` computed by the
    fused paged STFT+EMA kernel, given *instead of* ``attn`` to policies that only need NAMM's
    spectral features (:attr:`EvictionPolicy.accepts_paged_features`)."""


class PolicyState:
    """Per-request, per-layer memory of a policy; must be filtered with the cache."""

    def filter(self, keep: Tensor) -> None:  # noqa: B027 - stateless policies need nothing
        """Drop evicted tokens. ``keep``: bool [kv_heads, n_tokens] (or [n_tokens] for all heads)."""


class EvictionPolicy(ABC):
    """One eviction method: a ``score()`` and a selection rule.

    Subclasses set ``name`` and are registered by one line in :mod:`vllm_namm.policies.registry`.
    A policy with settings of its own declares them as a :class:`~vllm_namm.settings.PolicySettings`
    model in ``Settings`` (their flags and per-request keys come from there) and reads them in
    :meth:`from_config`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type[PolicySettings]] = PolicySettings
    """The policy's own knobs: fields of :class:`~vllm_namm.config.EvictionConfig` (see :class:`~vllm_namm.settings.Knob`)."""
    evicts: ClassVar[bool] = True
    """False for ``none``: vLLM runs unchanged."""
    needs_attention: ClassVar[bool] = True
    needs_keys: ClassVar[bool] = False
    accepts_paged_features: ClassVar[bool] = False
    """True when the policy can use ``LayerView.paged_features`` instead of ``attn``."""
    attention_window: int | None = None
    """Only the newest this-many queries' attention rows are read (SnapKV's observation window): the
    engine computes only those rows (each row's softmax is its own, so they are exact)."""
    attention_sums: ClassVar[bool] = False
    """Only the attention summed over the queries is read (H2O): the engine may give ``attn_sums``
    instead of ``attn``, computed without writing the ``[kv, n_q, n]`` matrix."""
    budget_rule: ClassVar[BudgetRule] = "none"
    """Whether a budget is ``required`` (the policy only ranks), ``optional`` (it has a rule of its
    own and can also rank under one) or refused (``none``); read via :mod:`vllm_namm.policies.registry`."""
    budget: BudgetConfig | None = None
    """The budget this instance ranks under (None: its own rule). The one test of "is this a budget
    policy" at run time: ``policy.budget is not None``."""
    page_score: PageScore | None = None
    """Its own page aggregation under a budget (NAMM weights evolved with one); None = the server's."""
    hop: int = 16
    """Queries per STFT hop: a step scores whole hops, so its decisions do not depend on batching
    (NAMM: its weights' ``s_w``)."""

    @classmethod
    def from_config(cls, config: EvictionConfig, weights: WeightsStore) -> EvictionPolicy:
        """The policy ``config`` describes (its budget, protection and this policy's knobs).
        ``weights``: where a learnt policy reads its weights file (each file is loaded once per store)."""
        return cls()

    @classmethod  # noqa: B027 - most policies check nothing
    def check_config(cls, config: EvictionConfig) -> None:
        """Raise :class:`~vllm_namm.settings.Invalid` when this policy's knobs cannot work with the rest of
        ``config`` (checked by :class:`~vllm_namm.config.EvictionConfig` whenever the policy is chosen)."""

    def new_state(self, params: Tensor | None = None) -> PolicyState:
        """Fresh state for a new request/layer (before any token is cached).

        ``params``: the request's own scorer parameter vector (evolution candidates); only
        learnt policies take one.
        """
        if params is not None:
            raise ValueError(f"policy '{self.name}' takes no parameter vector")
        return PolicyState()

    def prepare(self, view: LayerView, state: PolicyState) -> Any:
        """Per-layer part of :meth:`score`, run as soon as the layer's attention is available (the
        engine drops ``view.attn`` right after). Default: the scores themselves."""
        return self.score(view, state)

    def score_prepared(self, prepared: list[Any]) -> list[Tensor]:
        """Scores [kv_heads, n_tokens] from :meth:`prepare`'s results of many layers and requests.
        The engine calls it once per policy and step, so a learnt scorer batches them in one call."""
        return prepared

    @abstractmethod
    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        """Scores [kv_heads, n_tokens], higher = more worth keeping.

        Called exactly once per eviction step and layer; may update ``state`` (e.g. the
        EMA of spectrograms) to include this step's queries. Must not filter it.
        """

    @abstractmethod
    def select(self, scores: Tensor, view: LayerView) -> Tensor:
        """Token-level keep mask bool [kv_heads, n_tokens] *before* protection."""


def _token_rank(view: LayerView, n_tokens: int, device: torch.device) -> Tensor:
    """[kv_heads, n_tokens] rank of each token by position (0 = oldest)."""
    kv_heads = view.positions.shape[0]
    order = torch.argsort(view.positions, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n_tokens, device=device).expand(kv_heads, -1))
    return rank


def protected_mask(view: LayerView, cfg: ProtectConfig) -> Tensor:
    """bool [kv_heads, n_tokens]: tokens no policy may evict under ``cfg``.

    The ``sink_tokens`` oldest and ``recent_tokens`` newest tokens of each head (by logical
    position), and, with ``cfg.new_tokens``, the ``num_new_tokens`` cached since the last step.
    """
    n = view.positions.shape[-1]
    rank = _token_rank(view, n, view.positions.device)
    mask = (rank < cfg.sink_tokens) | (rank >= n - cfg.recent_tokens)
    if cfg.new_tokens and view.num_new_tokens > 0:
        mask |= rank >= n - view.num_new_tokens
    return mask


def protect(keep: Tensor, view: LayerView, cfg: ProtectConfig) -> Tensor:
    """``keep`` with every protected token forced in (see :func:`protected_mask`)."""
    return keep | protected_mask(view, cfg)


def sanitize_scores(scores: Tensor) -> Tensor:
    """NaN scores become +inf: a broken score must keep a token, never evict it."""
    return torch.nan_to_num(scores.float(), nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def equalize_head_drops(keep: Tensor, scores: Tensor) -> Tensor:
    """evo-memory ``BinarySelection``/``threshold_score_idxs`` count rule for per-head caches.

    Each KV head drops its *own* lowest-scored tokens among those ``keep`` rejects, but every
    head drops the same number: the smallest count of rejected tokens over the heads, so the
    per-layer cache stays rectangular. Tokens ``keep`` accepts are never dropped.
    """
    dropped = ~keep
    d = int(dropped.sum(dim=-1).min().item()) if keep.numel() else 0
    if d == 0:
        return torch.ones_like(keep)
    s = sanitize_scores(scores)
    order = torch.argsort(s, dim=-1, stable=True)
    order = torch.gather(
        order, -1, torch.argsort(torch.gather(keep, -1, order).to(torch.int8), dim=-1, stable=True)
    )
    out = torch.ones_like(keep)
    out.scatter_(-1, order[:, :d], False)
    return out


def topk_keep(scores: Tensor, k: int) -> Tensor:
    """bool [kv_heads, n_tokens] keeping exactly the ``k`` best-scored tokens of each head.

    Ties break towards the newer token (stable sort over oldest-first tokens); NaN counts as
    the best score.
    """
    n = scores.shape[-1]
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    order = torch.argsort(sanitize_scores(scores), dim=-1, stable=True)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(-1, order[:, n - k :], True)
    return keep


def filter_tokens(x: Tensor, keep: Tensor) -> Tensor:
    """Gather kept tokens of ``x`` [kv_heads, n_tokens, ...] with a [n_tokens] or per-head mask.

    A per-head mask must keep the same count on every head (the reference runner's rule), so
    the result stays rectangular.
    """
    keep = keep.to(device=x.device, dtype=torch.bool)
    if keep.shape[-1] != x.shape[1]:
        raise ValueError(f"keep mask covers {keep.shape[-1]} tokens, state holds {x.shape[1]}")
    if keep.dim() == 1:
        return x[:, keep]
    counts = keep.sum(dim=-1)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"per-head keep masks must keep equal counts, got {counts.tolist()}")
    idx = torch.nonzero(keep, as_tuple=False)[:, 1].view(keep.shape[0], -1)  # row-major per head
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)
