"""Which logical pages the paged vLLM engine frees, and what rounding to pages costs.

vLLM shares one block table across the layers of a KV-cache group and across KV heads, so a
block can only be freed when the policy is done with it everywhere. Two pure functions decide:

* :func:`plan_pages` (token-level selection, and NAMM): per-layer, per-head token keep masks
  become pages to free under a page rule (``all`` / ``majority`` / ``any``). Budget policies
  whose heads disagree free almost nothing under ``all``.
* :func:`select_pages` (page-level selection, budget policies): token scores are aggregated
  to one score per page over tokens, KV heads and layers, and the best whole pages are kept
  within the budget, so a budget is met where memory is counted.

Under tensor parallelism each worker holds some KV heads of every layer but all share one
block table: both functions first reduce every worker's tallies to per-page sums and maxima
(:class:`PageVotes`), which one all-reduce per operation combines (``reduce``), and then
decide from the combined tallies, identically on every worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from vllm_namm.config import PageRule, PageScore


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


def plan_pages(
    keep_masks: Sequence[Tensor],
    positions: Tensor,
    block_size: int,
    rule: PageRule = "all",
    protected_pages: Iterable[int] = (),
    protect_first_page: bool = True,
    protect_from_position: int | None = None,
    reduce: Reduce | None = None,
) -> PagePlan:
    """Which logical pages to free, given token keep masks of the layers sharing the pages.

    ``keep_masks``: one bool [kv_heads, n_tokens] (or [n_tokens]) per layer, aligned with
    ``positions`` [n_tokens] (the logical positions of the tokens still cached, shared by all
    layers); page ``p`` holds positions ``[p * block_size, (p + 1) * block_size)``.

    ``rule`` over the (layer, head, token) entries of a page still present:
    ``all`` (default) frees a page only if every entry is evicted; ``majority`` if more than
    half are; ``any`` if at least one is.

    Never freed: ``protected_pages``, page 0 (attention sink) unless ``protect_first_page`` is
    off, and every page holding a position >= ``protect_from_position`` (default: the newest
    token's page, the one being written; pass the first unscored position to keep unscored
    tokens too).

    ``reduce`` (tensor parallel): each worker passes the masks of its own KV heads, and
    ``reduce(t, "sum")`` must return the sum of ``t`` over the workers (the same on every
    worker), so that all of them free the same pages; see :func:`reduce_votes`.
    """
    votes = rule_votes(
        keep_masks, positions, block_size, rule, protected_pages, protect_first_page, protect_from_position
    )
    if reduce is not None:
        reduce_votes([votes], reduce)
    return votes.decide()


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


def _page_index(positions: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return torch.unique(positions.long() // block_size, return_inverse=True)


def _fixed_protection(
    pages: Tensor,
    positions: Tensor,
    block_size: int,
    protected_pages: Iterable[int],
    protect_first_page: bool,
    protect_from_position: int | None,
) -> Tensor:
    newest = int(positions.max().item()) if protect_from_position is None else protect_from_position
    protected = pages >= newest // block_size
    if protect_first_page:
        protected |= pages == 0
    prot = torch.as_tensor(list(protected_pages), dtype=pages.dtype, device=pages.device)
    if prot.numel():
        protected |= torch.isin(pages, prot)
    return protected


def _mask_tallies(masks: Sequence[Tensor], inverse: Tensor, n_pages: int) -> tuple[Tensor, Tensor]:
    """float64 [L, n_pages] evicted entries and all entries per layer and page."""
    device = inverse.device
    evicted = torch.zeros(len(masks), n_pages, dtype=torch.float64, device=device)
    entries = torch.zeros_like(evicted)
    for layer, m in enumerate(masks):
        evicted[layer].index_add_(0, inverse, (~m).sum(dim=0).double())
        entries[layer].index_add_(
            0, inverse, torch.full((m.shape[-1],), float(m.shape[0]), dtype=torch.float64, device=device)
        )
    return evicted, entries


def _as_rows(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 1 else t


def rule_votes(
    keep_masks: Sequence[Tensor],
    positions: Tensor,
    block_size: int,
    rule: PageRule = "all",
    protected_pages: Iterable[int] = (),
    protect_first_page: bool = True,
    protect_from_position: int | None = None,
) -> PageVotes:
    """This worker's tallies for :func:`plan_pages` (same arguments)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not keep_masks:
        raise ValueError("keep_masks is empty: need at least one layer")
    if rule not in ("all", "majority", "any"):
        raise ValueError(f"unknown page rule {rule!r} (all, majority, any)")
    n = positions.shape[-1]
    device = positions.device
    masks = []
    for m in keep_masks:
        m = _as_rows(m.to(device=device, dtype=torch.bool))
        if m.shape[-1] != n:
            raise ValueError(f"a keep mask covers {m.shape[-1]} tokens, positions has {n}")
        masks.append(m)
    if n == 0:
        return _empty_votes("rule", len(masks), device)
    pages, inverse = _page_index(positions, block_size)
    evicted, entries = _mask_tallies(masks, inverse, pages.numel())
    fixed = _fixed_protection(
        pages, positions, block_size, protected_pages, protect_first_page, protect_from_position
    )
    return PageVotes(
        "rule", pages, inverse, len(masks), fixed, torch.cat([evicted, entries]), rule=rule, n_tokens=n
    )


def _empty_votes(kind: Literal["rule", "budget"], n_layers: int, device: torch.device | str) -> PageVotes:
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


def token_ranks(scores: Tensor) -> Tensor:
    """int64 [..., n]: each token's rank by score within its row (0 = lowest, n - 1 = highest).

    Ties break towards the newer token (stable sort over oldest-first tokens, as
    ``topk_keep``); NaN counts as the best score (a broken score keeps a token).
    """
    s = torch.nan_to_num(scores.float(), nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.argsort(s, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    return rank


def budget_pages(keep_tokens: int, block_size: int) -> int:
    """Pages a budget of ``keep_tokens`` tokens buys: ceil(keep_tokens / block_size)."""
    return -(-max(keep_tokens, 0) // block_size)


def select_pages(
    scores_per_layer: Sequence[Tensor],
    positions: Tensor,
    block_size: int,
    keep_tokens: int,
    aggregate: PageScore = "max",
    protected_token_mask: Tensor | None = None,
    protect_first_page: bool = True,
    protect_from_position: int | None = None,
    protected_pages: Iterable[int] = (),
    keep_masks: Sequence[Tensor] | None = None,
    reduce: Reduce | None = None,
) -> PagePlan:
    """Keep the best whole pages within a budget of ``keep_tokens`` tokens; free the others.

    ``scores_per_layer``: one float [kv_heads, n_tokens] (or [n_tokens]) per layer, higher =
    more worth keeping, aligned with ``positions`` [n_tokens] (logical positions of the cached
    tokens, shared by all layers; page ``p`` holds ``[p * block_size, (p + 1) * block_size)``).
    Scores of different heads and layers live on different scales (accumulated attention,
    key norms, recency), so each (layer, head) row is first turned into normalised ranks in
    [0, 1]; ``aggregate`` then scores a page over its (layer, head, token) entries:

    * ``max`` (default): the best normalised rank (a page survives if any layer and head ranks
      one of its tokens high); ties broken by ``mean``. Measured best: a page's few important
      entries (a needle's tokens in the heads that read them) decide, instead of being
      averaged away over its ``layers x heads x block_size`` entries;
    * ``mean``: the mean normalised rank (how much every head values the page, on average);
    * ``vote``: the share of entries the per-head token-level budget would keep (each head's
      best ``keep_tokens``), ties broken by ``mean``.

    Remaining ties go to the newer page. Protected pages are always kept and count inside the
    budget: page 0 (attention sink) unless ``protect_first_page`` is off, every page holding a
    position >= ``protect_from_position`` (default: the newest token's, the page being written;
    pass the first unscored position to keep unscored tokens too), ``protected_pages``, and
    every page holding a token of ``protected_token_mask`` (bool [n_tokens]: sink/recent
    tokens). Of the pages given, ``max(ceil(keep_tokens / block_size), #protected)`` stay (all
    of them if fewer): at most ceil(budget / block size) + the protected pages.

    ``keep_masks`` (the policy's token-level decisions, as for :func:`plan_pages`) only feed
    the statistics: how many of the token evictions it asked for the freed pages realise.
    Without them, ``requested`` = ``realised`` = the (head, token) entries freed per layer.

    ``reduce`` (tensor parallel): each worker passes the scores of its own KV heads, and
    ``reduce(t, op)`` combines ``t`` over the workers (:data:`Reduce`), so that every worker
    keeps the same pages: what :func:`select_pages` of all heads on one worker keeps.
    """
    votes = budget_votes(
        scores_per_layer,
        positions,
        block_size,
        keep_tokens,
        aggregate,
        protected_token_mask,
        protect_first_page,
        protect_from_position,
        protected_pages,
        keep_masks,
    )
    if reduce is not None:
        reduce_votes([votes], reduce)
    return votes.decide()


def budget_votes(
    scores_per_layer: Sequence[Tensor],
    positions: Tensor,
    block_size: int,
    keep_tokens: int,
    aggregate: PageScore = "max",
    protected_token_mask: Tensor | None = None,
    protect_first_page: bool = True,
    protect_from_position: int | None = None,
    protected_pages: Iterable[int] = (),
    keep_masks: Sequence[Tensor] | None = None,
) -> PageVotes:
    """This worker's tallies for :func:`select_pages` (same arguments)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not scores_per_layer:
        raise ValueError("scores_per_layer is empty: need at least one layer")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if aggregate not in ("mean", "max", "vote"):
        raise ValueError(f"unknown page score {aggregate!r} (max, mean, vote)")
    device = scores_per_layer[0].device
    n = positions.shape[-1]
    rows = []
    for s in scores_per_layer:
        s = _as_rows(s)
        if s.shape[-1] != n:
            raise ValueError(f"a layer's scores cover {s.shape[-1]} tokens, positions has {n}")
        rows.append(s.to(device))
    if keep_masks is not None:
        masks = [_as_rows(m.to(device=device, dtype=torch.bool)) for m in keep_masks]
    else:  # every entry counts as requested (see the docstring)
        masks = [torch.zeros(r.shape[0], n, dtype=torch.bool, device=device) for r in rows]
    if n == 0:
        votes = _empty_votes("budget", len(masks), device)
        votes.stats_from_masks = keep_masks is not None
        return votes
    pos = positions.to(device).long()
    pages, inverse = _page_index(pos, block_size)
    n_pages = pages.numel()
    evicted, entries = _mask_tallies(masks, inverse, n_pages)
    rank = token_ranks(torch.cat(rows))  # [layers * heads, n]
    scored = torch.zeros(n_pages, dtype=torch.float64, device=device).index_add_(
        0, inverse, torch.full((n,), float(rank.shape[0]), dtype=torch.float64, device=device)
    )
    rank_sum = torch.zeros(n_pages, dtype=torch.float64, device=device).index_add_(
        0, inverse, rank.sum(0).double()
    )
    best = torch.zeros(n_pages, dtype=torch.float64, device=device).scatter_reduce_(
        0, inverse, rank.amax(0).double() / max(n - 1, 1), "amax"
    )
    kept = (rank >= n - min(keep_tokens, n)).double().sum(0)
    votes_kept = torch.zeros(n_pages, dtype=torch.float64, device=device).index_add_(0, inverse, kept)
    protected = torch.zeros(n_pages, dtype=torch.float64, device=device)
    if protected_token_mask is not None:
        ptm = protected_token_mask.to(device=device, dtype=torch.bool).reshape(-1)
        if ptm.numel() != n:
            raise ValueError(f"protected_token_mask covers {ptm.numel()} tokens, positions has {n}")
        protected.index_add_(0, inverse, ptm.double()).clamp_(max=1.0)
    fixed = _fixed_protection(
        pages, pos, block_size, protected_pages, protect_first_page, protect_from_position
    )
    return PageVotes(
        "budget",
        pages,
        inverse,
        len(masks),
        fixed,
        torch.cat([evicted, entries, torch.stack([scored, rank_sum, votes_kept])]),
        torch.stack([best, protected]),
        n_tokens=n,
        keep_pages=budget_pages(keep_tokens, block_size),
        aggregate=aggregate,
        stats_from_masks=keep_masks is not None,
    )
