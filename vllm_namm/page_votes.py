"""Per-page tallies of one request and the page plan decided from them.

Every page decision is a sum or a max over (layer, KV head, token) entries, so workers that each
hold some KV heads (tensor parallel) or some layers (pipeline parallel) combine their tallies with
one all-reduce per operation (:func:`reduce_votes`) and then decide identically
(:meth:`PageVotes.decide`). Which entries are tallied: :mod:`vllm_namm.page_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from vllm_namm.settings import PageRule, PageScore


@dataclass
class PagePlan:
    """Outcome of :func:`plan_pages` or :func:`select_pages`.

    ``requested[l]``: (head, token) evictions layer ``l``'s policy asked for;
    ``realised[l]``: how many of those lie in freed pages; ``forced[l]``: (head, token)
    entries the layer wanted to keep but that are freed (only with ``majority``/``any``).
    """

    free_pages: list[int]
    token_keep: Tensor
    """bool [n_tokens]: tokens that survive (for ``PolicyState.filter``)."""
    requested: list[int] = field(default_factory=list)
    realised: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)

    @property
    def realised_fraction(self) -> list[float]:
        """Per layer: realised / requested (1.0 when nothing was requested)."""
        return [r / q if q else 1.0 for r, q in zip(self.realised, self.requested, strict=True)]

    @property
    def overall_realised_fraction(self) -> float:
        q = sum(self.requested)
        return sum(self.realised) / q if q else 1.0


Reduce = Callable[[Tensor, str], Tensor]
"""``reduce(t, op)``: ``t`` combined element-wise over the workers that share a block table
(``op`` "sum" or "max"), identical on every worker. None = one worker."""


@dataclass
class PageVotes:
    """One request's per-page tallies on one worker, before the workers agree on them.

    Everything a page decision depends on is a sum or a max over (layer, KV head, token)
    entries, so workers that each hold some KV heads (tensor parallel) or some layers
    (pipeline parallel, :meth:`place_layers`) can combine their tallies with one all-reduce
    per operation and then decide identically
    (:func:`reduce_votes`, :meth:`decide`). Counts are float64: sums of integers, exact
    whatever order the workers add them in.

    ``sums`` rows: ``[0, L)`` evicted (layer, head, token) entries per layer and page,
    ``[L, 2L)`` all entries per layer and page; for page selection also ``2L`` the scored
    entries per page, ``2L + 1`` their summed integer token ranks and ``2L + 2`` the per-head
    budget votes. ``maxes`` (page selection): row 0 the best normalised rank, row 1 protected
    tokens (0/1).
    """

    kind: Literal["rule", "budget"]
    pages: Tensor
    inverse: Tensor
    num_layers: int
    fixed_protected: Tensor
    """bool [n_pages]: protected whatever the scores (sink, newest, explicitly protected)."""
    sums: Tensor
    maxes: Tensor | None = None
    rule: PageRule = "all"
    n_tokens: int = 0
    keep_pages: int = 0
    """Page selection: pages the budget buys."""
    aggregate: PageScore = "max"
    stats_from_masks: bool = True
    """Page selection without keep masks: requested = realised = the entries freed."""

    def place_layers(self, offset: int, total: int) -> None:
        """Re-index the per-layer rows as layers ``[offset, offset + L)`` of ``total`` (zeros
        elsewhere), so that pipeline stages holding different layers reduce row for row."""
        n_layers = self.num_layers
        if (offset, total) == (0, n_layers):
            return
        if offset < 0 or offset + n_layers > total:
            raise ValueError(f"layers [{offset}, {offset + n_layers}) do not fit in {total}")
        rows = torch.zeros(
            2 * total + self.sums.shape[0] - 2 * n_layers,
            self.sums.shape[1],
            dtype=self.sums.dtype,
            device=self.sums.device,
        )
        rows[offset : offset + n_layers] = self.sums[:n_layers]
        rows[total + offset : total + offset + n_layers] = self.sums[n_layers : 2 * n_layers]
        rows[2 * total :] = self.sums[2 * n_layers :]
        self.sums, self.num_layers = rows, total

    def decide(self) -> PagePlan:
        """The page plan from (reduced) tallies: identical on every worker that holds them."""
        n_layers = self.num_layers
        evicted, entries = self.sums[:n_layers], self.sums[n_layers : 2 * n_layers]
        if self.kind == "rule":
            frac = evicted.sum(0) / entries.sum(0)
            if self.rule == "all":
                free = frac >= 1.0
            elif self.rule == "majority":
                free = frac > 0.5
            else:
                free = frac > 0.0
            free &= ~self.fixed_protected
        else:
            free = self._select()
        return self._plan(free, evicted, entries)

    def _select(self) -> Tensor:
        n_layers = self.num_layers
        assert self.maxes is not None
        total = self.sums[2 * n_layers]
        mean = self.sums[2 * n_layers + 1] / max(self.n_tokens - 1, 1) / total
        if self.aggregate == "mean":
            primary, secondary = mean, torch.zeros_like(mean)
        elif self.aggregate == "max":
            primary, secondary = self.maxes[0], mean
        else:
            primary, secondary = self.sums[2 * n_layers + 2] / total, mean
        # ascending by (primary, secondary, page): the best page last
        order = torch.argsort(secondary, stable=True)
        order = order[torch.argsort(primary[order], stable=True)]
        protected = self.fixed_protected | (self.maxes[1] > 0)
        slots = max(self.keep_pages - int(protected.sum().item()), 0)
        best_first = order.flip(0)
        candidates = best_first[~protected[best_first]]
        keep = protected.clone()
        keep[candidates[:slots]] = True
        return ~keep

    def _plan(self, free: Tensor, evicted: Tensor, entries: Tensor) -> PagePlan:
        token_freed = free[self.inverse]
        freed = free.to(evicted.dtype)
        requested = [int(v) for v in evicted.sum(1).tolist()]
        realised = [int(v) for v in (evicted * freed).sum(1).tolist()]
        forced = [int(v) for v in ((entries - evicted) * freed).sum(1).tolist()]
        if not self.stats_from_masks:
            requested = list(realised)
        return PagePlan(
            free_pages=self.pages[free].tolist(),
            token_keep=~token_freed,
            requested=requested,
            realised=realised,
            forced=forced,
        )


def reduce_votes(votes: Sequence[PageVotes], reduce: Reduce) -> None:
    """Combine the tallies of many requests over the workers: one ``reduce`` call per operation
    for the whole batch (every worker must pass the same requests in the same order)."""
    for attr, op in (("sums", "sum"), ("maxes", "max")):
        parts = [getattr(v, attr) for v in votes if getattr(v, attr) is not None]
        if not parts:
            continue
        flat = reduce(torch.cat([p.reshape(-1) for p in parts]), op).to(parts[0].device)
        offset = 0
        for v in votes:
            part = getattr(v, attr)
            if part is not None:
                setattr(v, attr, flat[offset : offset + part.numel()].view_as(part))
                offset += part.numel()


def empty_votes(kind: Literal["rule", "budget"], n_layers: int, device: torch.device | str) -> PageVotes:
    """No token: nothing to free (still takes part in a reduce, with zero-size tallies)."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    rows = 2 * n_layers + (3 if kind == "budget" else 0)
    return PageVotes(
        kind,
        empty,
        empty,
        n_layers,
        torch.zeros(0, dtype=torch.bool, device=device),
        torch.zeros(rows, 0, dtype=torch.float64, device=device),
        torch.zeros(2, 0, dtype=torch.float64, device=device) if kind == "budget" else None,
    )
