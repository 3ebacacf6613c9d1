"""Which logical pages the paged vLLM engine frees, and what rounding to pages costs.

vLLM shares one block table across the layers of a KV-cache group and across KV heads, so a
block can only be freed when the policy is done with it everywhere. Two pure functions decide:

* :func:`plan_pages` (token-level selection, and NAMM): per-layer, per-head token keep masks
  become pages to free under a page rule (``all`` / ``majority`` / ``any``). Budget policies
  whose heads disagree free almost nothing under ``all``.
* :func:`select_pages` (page-level selection, budget policies): token scores are aggregated
  to one score per page over tokens, KV heads and layers, and the best whole pages are kept
  within the budget, so a budget is met where memory is counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def plan_pages(
    keep_masks: Sequence[Tensor],
    positions: Tensor,
    block_size: int,
    rule: PageRule = "all",
    protected_pages: Iterable[int] = (),
    protect_first_page: bool = True,
    protect_from_position: int | None = None,
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
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not keep_masks:
        raise ValueError("keep_masks is empty: need at least one layer")
    n = positions.shape[-1]
    device = positions.device
    if n == 0:
        return PagePlan([], torch.ones(0, dtype=torch.bool, device=device), [0] * len(keep_masks),
                        [0] * len(keep_masks), [0] * len(keep_masks))
    pages, inverse = torch.unique(positions.long() // block_size, return_inverse=True)
    n_pages = pages.numel()
    evicted = torch.zeros(n_pages, dtype=torch.float64, device=device)
    entries = torch.zeros(n_pages, dtype=torch.float64, device=device)
    masks = []
    for m in keep_masks:
        m = m.to(device=device, dtype=torch.bool)
        m = m.unsqueeze(0) if m.dim() == 1 else m
        if m.shape[-1] != n:
            raise ValueError(f"a keep mask covers {m.shape[-1]} tokens, positions has {n}")
        masks.append(m)
        per_token_evicted = (~m).sum(dim=0).double()  # [n]
        evicted.index_add_(0, inverse, per_token_evicted)
        entries.index_add_(0, inverse, torch.full((n,), float(m.shape[0]), dtype=torch.float64, device=device))
    frac = evicted / entries
    if rule == "all":
        free = frac >= 1.0
    elif rule == "majority":
        free = frac > 0.5
    elif rule == "any":
        free = frac > 0.0
    else:
        raise ValueError(f"unknown page rule {rule!r} (all, majority, any)")
    newest = int(positions.max().item()) if protect_from_position is None else protect_from_position
    free &= pages < newest // block_size
    if protect_first_page:
        free &= pages != 0
    prot = torch.as_tensor(list(protected_pages), dtype=pages.dtype, device=device)
    if prot.numel():
        free &= ~torch.isin(pages, prot)
    return _plan(pages, free, inverse, masks)


def _plan(pages: Tensor, free: Tensor, inverse: Tensor, masks: Sequence[Tensor]) -> PagePlan:
    """The :class:`PagePlan` freeing ``pages[free]``, with the rounding statistics of ``masks``."""
    token_freed = free[inverse]  # [n]
    requested, realised, forced = [], [], []
    for m in masks:
        ev = ~m
        requested.append(int(ev.sum().item()))
        realised.append(int((ev & token_freed).sum().item()))
        forced.append(int((m & token_freed).sum().item()))
    return PagePlan(
        free_pages=pages[free].tolist(),
        token_keep=~token_freed,
        requested=requested,
        realised=realised,
        forced=forced,
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
    """
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
        s = s.unsqueeze(0) if s.dim() == 1 else s
        if s.shape[-1] != n:
            raise ValueError(f"a layer's scores cover {s.shape[-1]} tokens, positions has {n}")
        rows.append(s.to(device))
    masks = []
    for m in keep_masks if keep_masks is not None else ():
        m = m.to(device=device, dtype=torch.bool)
        masks.append(m.unsqueeze(0) if m.dim() == 1 else m)
    if n == 0:
        zeros = [0] * len(rows)
        return PagePlan([], torch.ones(0, dtype=torch.bool, device=device), zeros, zeros, zeros)
    pos = positions.to(device).long()
    pages, inverse = torch.unique(pos // block_size, return_inverse=True)
    n_pages = pages.numel()
    rank = token_ranks(torch.cat(rows))  # [layers * heads, n]
    n_rows = rank.shape[0]
    entries = torch.zeros(n_pages, device=device).index_add_(0, inverse, torch.ones(n, device=device)) * n_rows
    norm = rank.float() / max(n - 1, 1)
    mean = torch.zeros(n_pages, device=device).index_add_(0, inverse, norm.sum(0)) / entries
    if aggregate == "mean":
        primary, secondary = mean, torch.zeros_like(mean)
    elif aggregate == "max":
        primary = torch.zeros(n_pages, device=device).scatter_reduce_(0, inverse, norm.amax(0), "amax")
        secondary = mean
    else:
        kept = (rank >= n - min(keep_tokens, n)).float().sum(0)
        primary = torch.zeros(n_pages, device=device).index_add_(0, inverse, kept) / entries
        secondary = mean
    # ascending by (primary, secondary, page): the best page last
    order = torch.argsort(secondary, stable=True)
    order = order[torch.argsort(primary[order], stable=True)]
    newest = int(pos.max().item()) if protect_from_position is None else protect_from_position
    protected = pages >= newest // block_size
    if protect_first_page:
        protected |= pages == 0
    prot = torch.as_tensor(list(protected_pages), dtype=pages.dtype, device=device)
    if prot.numel():
        protected |= torch.isin(pages, prot)
    if protected_token_mask is not None:
        ptm = protected_token_mask.to(device=device, dtype=torch.bool).reshape(-1)
        if ptm.numel() != n:
            raise ValueError(f"protected_token_mask covers {ptm.numel()} tokens, positions has {n}")
        protected |= torch.zeros(n_pages, device=device).index_add_(0, inverse, ptm.float()) > 0
    slots = max(budget_pages(keep_tokens, block_size) - int(protected.sum().item()), 0)
    best_first = order.flip(0)
    candidates = best_first[~protected[best_first]]
    keep = protected.clone()
    keep[candidates[:slots]] = True
    free = ~keep
    if masks:
        return _plan(pages, free, inverse, masks)
    plan = _plan(pages, free, inverse, [torch.zeros(r.shape[0], n, dtype=torch.bool, device=device) for r in rows])
    plan.requested = list(plan.realised)
    return plan
