"""Page-level aggregation of token-level eviction decisions (the paged vLLM engine).

vLLM shares one block table across the layers of a KV-cache group and across KV heads, so a
block can only be freed when the policy is done with it everywhere. This pure function turns
per-layer, per-head token keep masks into the list of logical pages to free and reports what
the rounding to pages costs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vllm_namm.config import PageRule


@dataclass
class PagePlan:
    """Outcome of :func:`plan_pages`.

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
