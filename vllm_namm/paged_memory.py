"""Per-request eviction state of the paged engine, free of vLLM imports.

The vLLM glue (:mod:`vllm_namm.vllm_patch.runner`) feeds each request's queries in as the
model runs and asks :func:`eviction_step` which logical pages to free every ``interval``
queries. Everything here is plain torch so that it is unit-testable without an engine.

Decode-time queries: we keep the last unscored queries of every layer (at most
``interval + 15`` of them) and recompute their attention columns from the paged keys at
the step. For Llama-3-8B shapes that is 512 x 32 heads x 128 x 2 B = 4 MiB per layer and
request; the alternative (incremental spectrograms) would need the softmax normaliser of
every past query against keys that may since have been evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from vllm_namm.config import EvictionConfig
from vllm_namm.features import attention_columns
from vllm_namm.paging import PagePlan, plan_pages, select_pages
from vllm_namm.policies import EvictionPolicy, LayerView, PolicyState, protect, protected_mask
from vllm_namm.policies.budget import BudgetPolicy


@dataclass
class StepStats:
    """What one eviction step of one request did (for logs and /metrics)."""

    freed_pages: list[int]
    requested_token_evictions: int
    realised_token_evictions: int


@dataclass
class RequestMemory:
    """Eviction bookkeeping of one running request (reset on preemption)."""

    policy: EvictionPolicy
    num_layers: int
    block_size: int
    params: Tensor | None = None
    """This request's own NAMM parameter vector (evolution candidates), else None."""
    num_tokens: int = 0
    """Logical tokens whose KV is in the cache (evicted ones included)."""
    evicted_pages: set[int] = field(default_factory=set)
    tokens_at_last_step: int = 0
    queries: list[list[Tensor]] = field(default_factory=list)
    """Per layer: unscored query chunks [n, q_heads, d], oldest first."""
    query_positions: list[Tensor] = field(default_factory=list)
    states: list[PolicyState] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self) -> None:
        self.queries = [[] for _ in range(self.num_layers)]
        if self.params is not None:
            self.states = [self.policy.new_state(params=self.params) for _ in range(self.num_layers)]  # type: ignore[call-arg]
        else:
            self.states = [self.policy.new_state() for _ in range(self.num_layers)]

    @property
    def num_unscored(self) -> int:
        return sum(int(p.numel()) for p in self.query_positions)

    @property
    def logical_pages(self) -> int:
        return -(-self.num_tokens // self.block_size)

    @property
    def live_pages(self) -> list[int]:
        return [p for p in range(self.logical_pages) if p not in self.evicted_pages]

    def live_positions(self, device: torch.device | str = "cpu") -> Tensor:
        """Logical positions [n_live] of the cached tokens, oldest first."""
        pos = torch.arange(self.num_tokens, device=device)
        if not self.evicted_pages:
            return pos
        dead = torch.tensor(sorted(self.evicted_pages), device=device)
        return pos[~torch.isin(pos // self.block_size, dead)]

    def add_queries(self, per_layer: list[Tensor], start_position: int) -> None:
        """Record this step's queries (one [n, q_heads, d] per layer) starting at ``start_position``."""
        n = per_layer[0].shape[0]
        if n == 0:
            return
        for layer, q in enumerate(per_layer):
            self.queries[layer].append(q)
        self.query_positions.append(torch.arange(start_position, start_position + n))
        self.num_tokens = max(self.num_tokens, start_position + n)

    def take_queries(self, n_q: int) -> tuple[list[Tensor], Tensor]:
        """Pop the oldest ``n_q`` unscored queries of every layer, and their positions."""
        pos = torch.cat(self.query_positions)
        per_layer = [torch.cat(chunks) for chunks in self.queries]
        rest = pos[n_q:]
        self.query_positions = [rest] if rest.numel() else []
        self.queries = [[q[n_q:]] if rest.numel() else [] for q in per_layer]
        return [q[:n_q] for q in per_layer], pos[:n_q]

    def due(self, interval: int, prompt_len: int, hop: int = 16) -> bool:
        """An eviction step is due every ``interval`` queries, and once when the prompt ends
        if at least one STFT hop is waiting (unlike evo-memory, which never scores the prompt's
        last, shorter chunk: this bounds the cache a request holds when decoding starts)."""
        if self.policy.name == "none":
            return False
        n = self.num_unscored
        return n >= interval or (self.num_tokens == prompt_len and n >= hop)


def eviction_step(
    mem: RequestMemory,
    config: EvictionConfig,
    read_keys: Callable[[int, list[int]], Tensor],
    scale: float,
    hop: int = 16,
    columns: Callable[[int, Tensor, Tensor, Tensor, list[int]], Tensor] | None = None,
    kv_heads: int = 1,
    device: torch.device | str = "cpu",
) -> StepStats:
    """Score every cached token of every layer, free the pages all layers agree on.

    ``read_keys(layer, live_pages)`` returns that layer's cached keys of those logical pages,
    [n_live_tokens(+ padding of the last page), kv_heads, d] in page order (the caller knows
    the paged layout). ``columns(layer, queries, query_positions, positions, live_pages)``,
    when given, computes the attention columns straight from the paged cache (the Triton
    kernel on GPU); otherwise they come from ``read_keys`` and the torch reference. Uses the
    oldest ``floor(unscored / hop) * hop`` unscored queries (exactly ``interval`` when prompt
    chunks are aligned, as the scheduler arranges); the remainder waits for the next step.
    Updates ``mem`` (evicted pages, filtered policy states) and returns what it freed.
    """
    n_q = (mem.num_unscored // hop) * hop
    queries, qpos = mem.take_queries(n_q)
    live_pages = mem.live_pages
    positions = mem.live_positions()
    n_live = positions.numel()
    policy = mem.policy
    pos = positions.to(device)
    keep_masks: list[Tensor] = []
    scores_per_layer: list[Tensor] = []
    for layer in range(mem.num_layers):
        keys = read_keys(layer, live_pages)[:n_live] if (policy.needs_keys or columns is None) else None
        attn = None
        if policy.needs_attention:
            if columns is not None:
                attn = columns(layer, queries[layer], qpos, positions, live_pages)[..., :n_live]
            else:
                assert keys is not None
                attn = attention_columns(queries[layer].to(keys.device), keys, qpos.to(keys.device),
                                         positions.to(keys.device), scale)
        view = LayerView(
            attn=attn,
            keys=keys.permute(1, 0, 2) if policy.needs_keys else None,
            positions=pos.unsqueeze(0).expand(kv_heads, -1),
            query_positions=qpos.to(device),
            num_new_tokens=mem.num_tokens - mem.tokens_at_last_step,
        )
        scores = policy.score(view, mem.states[layer])
        scores_per_layer.append(scores)
        keep_masks.append(protect(policy.select(scores, view), view, config.protect))
    # Unscored queries left over belong to tokens that must stay: protect their pages.
    first_unscored = int(torch.cat(mem.query_positions).min()) if mem.query_positions else mem.num_tokens - 1
    if config.selection == "page" and isinstance(policy, BudgetPolicy):  # whole pages within the budget
        plan: PagePlan = select_pages(
            scores_per_layer, positions, mem.block_size,
            keep_tokens=policy.budget.size(n_live, mem.num_tokens), aggregate=config.page_score,
            protected_token_mask=protected_mask(view, config.protect).any(dim=0),
            protect_from_position=min(first_unscored, mem.num_tokens - 1), keep_masks=keep_masks,
        )
    else:
        plan = plan_pages(
            keep_masks,
            positions,
            mem.block_size,
            rule=config.page_rule,
            protect_from_position=min(first_unscored, mem.num_tokens - 1),
        )
    for state in mem.states:
        state.filter(plan.token_keep.to(state_device(state, plan.token_keep)))
    mem.evicted_pages.update(plan.free_pages)
    mem.tokens_at_last_step = mem.num_tokens
    mem.steps += 1
    return StepStats(plan.free_pages, sum(plan.requested), sum(plan.realised))


def state_device(state: PolicyState, fallback: Tensor) -> torch.device:
    """Device of a policy state's tensors (states created lazily have none yet)."""
    for value in vars(state).values():
        if isinstance(value, Tensor):
            return value.device
    return fallback.device
