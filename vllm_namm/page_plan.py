"""Which logical pages the paged vLLM engine frees, and what rounding to pages costs.

vLLM shares one block table across the layers of a KV-cache group and across KV heads, so a
block can only be freed when the policy is done with it everywhere. Two pure functions decide,
each from one description of the request's step:

* :func:`plan_pages` (:class:`PagesByRule`: token-level selection, and NAMM): per-layer, per-head
  token keep masks become pages to free under a page rule (``all`` / ``majority`` / ``any``).
  Budget policies whose heads disagree free almost nothing under ``all``.
* :func:`select_pages` (:class:`PagesByBudget`: page-level selection, budget policies): token
  scores are aggregated to one score per page over tokens, KV heads and layers, and the best whole
  pages are kept within the budget, so a budget is met where memory is counted.

Under tensor parallelism each worker holds some KV heads of every layer but all share one
block table: both functions first reduce every worker's tallies to per-page sums and maxima
(:class:`~vllm_namm.page_votes.PageVotes`), which one all-reduce per operation combines
(``reduce``), and then decide from the combined tallies, identically on every worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_namm.page_votes import PagePlan, PageVotes, Reduce, empty_votes, reduce_votes
from vllm_namm.settings import PageRule, PageScore


@dataclass(frozen=True)
class PagesByRule:
    """Token keep masks of the layers sharing one request's pages, to be turned into freed pages.

    ``keep_masks``: one bool [kv_heads, n_tokens] (or [n_tokens]) per layer, aligned with
    ``positions`` [n_tokens] (the logical positions of the tokens still cached, shared by all
    layers); page ``p`` holds positions ``[p * block_size, (p + 1) * block_size)``.

    ``rule`` over the (layer, head, token) entries of a page still present: ``all`` (default) frees
    a page only if every entry is evicted; ``majority`` if more than half are; ``any`` if at least one is.

    Never freed: ``protected_pages``, page 0 (attention sink) unless ``protect_first_page`` is
    off, and every page holding a position >= ``protect_from_position`` (default: the newest
    token's page, the one being written; pass the first unscored position to keep unscored
    tokens too).
    """

    keep_masks: Sequence[Tensor]
    positions: Tensor
    block_size: int
    rule: PageRule = "all"
    protected_pages: Iterable[int] = ()
    protect_first_page: bool = True
    protect_from_position: int | None = None


@dataclass(frozen=True)
class PagesByBudget:
    """Token scores of the layers sharing one request's pages, and the budget its pages must meet.

    ``scores_per_layer``: one float [kv_heads, n_tokens] (or [n_tokens]) per layer, higher = more
    worth keeping, aligned with ``positions`` as in :class:`PagesByRule`. ``keep_tokens``: the
    budget. ``aggregate`` scores a page over its (layer, head, token) entries from each (layer,
    head) row's normalised ranks in [0, 1] (scores of different heads and layers live on different
    scales):

    * ``max`` (default): the best normalised rank (a page survives if any layer and head ranks
      one of its tokens high); ties broken by ``mean``. Measured best: a page's few important
      entries (a needle's tokens in the heads that read them) decide, instead of being
      averaged away over its ``layers x heads x block_size`` entries;
    * ``mean``: the mean normalised rank (how much every head values the page, on average);
    * ``vote``: the share of entries the per-head token-level budget would keep (each head's
      best ``keep_tokens``), ties broken by ``mean``.

    Protected pages (always kept, inside the budget): those of :class:`PagesByRule`, and every
    page holding a token of ``protected_token_mask`` (bool [n_tokens]: sink/recent tokens).
    ``keep_masks`` (the policy's token-level decisions) only feed the statistics: how many of the
    token evictions it asked for the freed pages realise; without them, ``requested`` =
    ``realised`` = the (head, token) entries freed per layer.
    """

    scores_per_layer: Sequence[Tensor]
    positions: Tensor
    block_size: int
    keep_tokens: int
    aggregate: PageScore = "max"
    protected_token_mask: Tensor | None = None
    protect_first_page: bool = True
    protect_from_position: int | None = None
    protected_pages: Iterable[int] = ()
    keep_masks: Sequence[Tensor] | None = None


def plan_pages(pages: PagesByRule, reduce: Reduce | None = None) -> PagePlan:
    """Which logical pages to free, given token keep masks (see :class:`PagesByRule`).

    ``reduce`` (tensor parallel): each worker passes the masks of its own KV heads, and
    ``reduce(t, "sum")`` must return the sum of ``t`` over the workers (the same on every
    worker), so that all of them free the same pages; see :func:`~vllm_namm.page_votes.reduce_votes`.
    """
    votes = rule_votes(pages)
    if reduce is not None:
        reduce_votes([votes], reduce)
    return votes.decide()


def select_pages(pages: PagesByBudget, reduce: Reduce | None = None) -> PagePlan:
    """Keep the best whole pages within a budget of ``keep_tokens`` tokens; free the others.

    Remaining ties go to the newer page. Of the pages given, ``max(ceil(keep_tokens / block_size),
    #protected)`` stay (all of them if fewer): at most ceil(budget / block size) + the protected
    pages. ``reduce`` (tensor parallel): each worker passes the scores of its own KV heads, and
    ``reduce(t, op)`` combines ``t`` over the workers (:data:`~vllm_namm.page_votes.Reduce`), so that
    every worker keeps the same pages: what :func:`select_pages` of all heads on one worker keeps.
    """
    votes = budget_votes(pages)
    if reduce is not None:
        reduce_votes([votes], reduce)
    return votes.decide()


def _page_index(positions: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return torch.unique(positions.long() // block_size, return_inverse=True)


def _fixed_protection(pages: Tensor, positions: Tensor, spec: PagesByRule | PagesByBudget) -> Tensor:
    """bool [n_pages]: pages kept whatever the scores (the newest, the sink, the explicitly protected)."""
    newest = spec.protect_from_position
    if newest is None:
        newest = int(positions.max().item())
    protected = pages >= newest // spec.block_size
    if spec.protect_first_page:
        protected |= pages == 0
    prot = torch.as_tensor(list(spec.protected_pages), dtype=pages.dtype, device=pages.device)
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


def rule_votes(spec: PagesByRule) -> PageVotes:
    """This worker's tallies for :func:`plan_pages`."""
    if spec.block_size <= 0:
        raise ValueError(f"block_size must be positive, got {spec.block_size}")
    if not spec.keep_masks:
        raise ValueError("keep_masks is empty: need at least one layer")
    if spec.rule not in ("all", "majority", "any"):
        raise ValueError(f"unknown page rule {spec.rule!r} (all, majority, any)")
    positions = spec.positions
    n = positions.shape[-1]
    device = positions.device
    masks = []
    for m in spec.keep_masks:
        m = _as_rows(m.to(device=device, dtype=torch.bool))
        if m.shape[-1] != n:
            raise ValueError(f"a keep mask covers {m.shape[-1]} tokens, positions has {n}")
        masks.append(m)
    if n == 0:
        return empty_votes("rule", len(masks), device)
    pages, inverse = _page_index(positions, spec.block_size)
    evicted, entries = _mask_tallies(masks, inverse, pages.numel())
    fixed = _fixed_protection(pages, positions, spec)
    return PageVotes(
        "rule", pages, inverse, len(masks), fixed, torch.cat([evicted, entries]), rule=spec.rule, n_tokens=n
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


def budget_votes(spec: PagesByBudget) -> PageVotes:
    """This worker's tallies for :func:`select_pages`."""
    block_size, keep_tokens = spec.block_size, spec.keep_tokens
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not spec.scores_per_layer:
        raise ValueError("scores_per_layer is empty: need at least one layer")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
    if spec.aggregate not in ("mean", "max", "vote"):
        raise ValueError(f"unknown page score {spec.aggregate!r} (max, mean, vote)")
    device = spec.scores_per_layer[0].device
    n = spec.positions.shape[-1]
    rows = []
    for s in spec.scores_per_layer:
        s = _as_rows(s)
        if s.shape[-1] != n:
            raise ValueError(f"a layer's scores cover {s.shape[-1]} tokens, positions has {n}")
        rows.append(s.to(device))
    if spec.keep_masks is not None:
        masks = [_as_rows(m.to(device=device, dtype=torch.bool)) for m in spec.keep_masks]
    else:  # every entry counts as requested (see PagesByBudget)
        masks = [torch.zeros(r.shape[0], n, dtype=torch.bool, device=device) for r in rows]
    if n == 0:
        votes = empty_votes("budget", len(masks), device)
        votes.stats_from_masks = spec.keep_masks is not None
        return votes
    pos = spec.positions.to(device).long()
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
    if spec.protected_token_mask is not None:
        ptm = spec.protected_token_mask.to(device=device, dtype=torch.bool).reshape(-1)
        if ptm.numel() != n:
            raise ValueError(f"protected_token_mask covers {ptm.numel()} tokens, positions has {n}")
        protected.index_add_(0, inverse, ptm.double()).clamp_(max=1.0)
    return PageVotes(
        "budget",
        pages,
        inverse,
        len(masks),
        _fixed_protection(pages, pos, spec),
        torch.cat([evicted, entries, torch.stack([scored, rank_sum, votes_kept])]),
        torch.stack([best, protected]),
        n_tokens=n,
        keep_pages=budget_pages(keep_tokens, block_size),
        aggregate=spec.aggregate,
        stats_from_masks=spec.keep_masks is not None,
    )


__all__ = [
    "PagePlan",
    "PagesByBudget",
    "PagesByRule",
    "PageVotes",
    "Reduce",
    "budget_pages",
    "budget_votes",
    "plan_pages",
    "reduce_votes",
    "rule_votes",
    "select_pages",
    "token_ranks",
]
