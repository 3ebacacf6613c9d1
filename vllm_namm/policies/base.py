"""The eviction-policy interface shared by the reference runner and the vLLM engine.

A policy sees one layer of one request at a time (:class:`LayerView`), keeps whatever
per-token memory it needs in its own :class:`PolicyState`, and answers with token-level
scores and a keep mask. Who applies the mask (per-head in the reference runner,
page-granular in vLLM) is not the policy's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


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
    where the causal mask hides the key. ``None`` when the policy does not need it."""
    keys: Tensor | None
    """[kv_heads, n_tokens, head_dim] cached keys (post-RoPE). ``None`` unless needed."""
    positions: Tensor
    """[kv_heads, n_tokens] int64 logical positions of the cached tokens (per head, because the
    reference runner lets heads keep different tokens)."""
    query_positions: Tensor
    """[n_queries] int64 logical positions of the queries in ``attn``."""
    num_new_tokens: int
    """How many trailing tokens entered the cache since this state's previous step."""


class PolicyState:
    """Per-request, per-layer memory of a policy; must be filtered with the cache."""

    def filter(self, keep: Tensor) -> None:  # noqa: B027 - stateless policies need nothing
        """Drop evicted tokens. ``keep``: bool [kv_heads, n_tokens] (or [n_tokens] for all heads)."""


class EvictionPolicy(ABC):
    """One eviction method: a ``score()`` and a selection rule.

    Subclasses set ``name`` and register themselves in :mod:`vllm_namm.policies`.
    """

    name: ClassVar[str]
    needs_attention: ClassVar[bool] = True
    needs_keys: ClassVar[bool] = False

    def new_state(self) -> PolicyState:
        """Fresh state for a new request/layer (before any token is cached)."""
        return PolicyState()

    @abstractmethod
    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        """Scores [kv_heads, n_tokens], higher = more worth keeping.

        Called exactly once per eviction step and layer; may update ``state`` (e.g. the
        EMA of spectrograms) to include this step's queries. Must not filter it.
        """

    @abstractmethod
    def select(self, scores: Tensor, view: LayerView) -> Tensor:
        """Token-level keep mask bool [kv_heads, n_tokens] *before* protection."""
