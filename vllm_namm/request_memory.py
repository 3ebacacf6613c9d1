"""Per-request eviction state of the paged engine, free of vLLM imports.

The vLLM glue (:mod:`vllm_namm.vllm_patch.runner_state`) feeds each request's queries in as the
model runs; every ``interval`` queries (and once at the end of the prompt) a request is due for an
eviction step, which decides which logical pages to free. Everything here is plain torch so that
it is unit-testable without an engine.

A step is one object, :class:`EvictionStep`, with one life cycle, so that its expensive middle can
run off the critical path (:mod:`vllm_namm.background`) and cover every request due at the same
engine step at once:

1. **begun** (:func:`begin_step`, engine thread): the request's due queries are taken and what the
   step covers is fixed: the *scored* tokens, i.e. the live tokens the step's queries have seen.
   Tokens newer than the last query (the tail of a prompt chunk that is not a whole STFT hop) wait
   for the next step, exactly as in evo-memory, which never scores a token no query attended. The
   request has this one step in flight (:attr:`RequestMemory.step`) until it is finished.
2. **computed** (:func:`~vllm_namm.eviction_batch.compute_steps`, any thread, many steps at once):
   attention columns layer by layer, each policy's per-layer work, ONE scoring call per policy, the
   token keep masks and the step's :attr:`~EvictionStep.plan`. It touches only the steps' own
   policy states and reads the paged cache through each step's :class:`~vllm_namm.cache_reader.CacheReader`.
3. **finished** (:meth:`EvictionStep.finish`, engine thread): the freed pages are recorded.

Decode-time queries: we keep the last unscored queries of every layer (at most
``interval + 15`` of them) and recompute their attention columns from the paged keys at
the step. For Llama-3-8B shapes that is 512 x 32 heads x 128 x 2 B = 4 MiB per layer and
request; the alternative (incremental spectrograms) would need the softmax normaliser of
every past query against keys that may since have been evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from vllm_namm.cache_reader import CacheReader, KeysReader, PagedCacheReader
from vllm_namm.config import EvictionConfig
from vllm_namm.eviction_batch import PeerStepError, compute_steps
from vllm_namm.page_votes import PagePlan
from vllm_namm.policies import EvictionPolicy, PolicyState


@dataclass
class StepOutcome:
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
    state_options: dict[str, Any] = field(default_factory=dict)
    """Other per-request options of the policy's states (``new_state`` arguments, e.g. an EMA coefficient)."""
    num_tokens: int = 0
    """Logical tokens whose KV is in the cache (evicted ones included)."""
    budget_scale: float = 1.0
    """This memory's share of a budget relative to the mean layer (per-layer pages under a pyramid
    allocation, :mod:`vllm_namm.layer_budgets`); 1 for pages shared by every layer."""
    evicted_pages: set[int] = field(default_factory=set)
    scored_tokens: int = 0
    """Tokens [0, scored_tokens) have been through a step (policy states track the live ones)."""
    queries: list[list[Tensor]] = field(default_factory=list)
    """Per layer: unscored query chunks [n, q_heads, d], oldest first."""
    query_positions: list[Tensor] = field(default_factory=list)
    states: list[PolicyState] = field(default_factory=list)
    steps: int = 0
    step: EvictionStep | None = None
    """The step begun and not finished yet (computing off the critical path), if any."""
    canonical: bool = True
    """Whether its history is the one a request with this prompt has on its own: every engine step
    since it started computed one ``interval``-aligned chunk of ``interval`` tokens of it. Only then
    is a step boundary's state a function of the prefix and the settings alone, so a later request
    may resume from it (:mod:`vllm_namm.step_snapshots`)."""

    def __post_init__(self) -> None:
        self.queries = [[] for _ in range(self.num_layers)]
        self.states = [
            self.policy.new_state(params=self.params, **self.state_options) for _ in range(self.num_layers)
        ]

    @property
    def pending(self) -> bool:
        return self.step is not None

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
        """An eviction step is due every ``interval`` queries, and once when the prompt has ended
        while at least one STFT hop of it is unscored (unlike evo-memory, which never scores the
        prompt's last, shorter chunk: this bounds the cache a request holds when decoding starts;
        if the previous step was still computing at the prompt's end, it runs at the next
        engine step). Never while the previous step is still being computed."""
        if not self.policy.evicts or self.step is not None:
            return False
        n = self.num_unscored
        prompt_tail = self.num_tokens >= prompt_len and prompt_len - self.scored_tokens >= hop
        return n >= interval or (prompt_tail and n >= hop)


@dataclass
class EvictionStep:
    """One request's eviction step, from :func:`begin_step` to :meth:`finish` (module docstring)."""

    mem: RequestMemory
    reader: CacheReader
    req_id: str
    queries: list[Tensor]
    """Per layer [n_q, q_heads, d]: the step's queries."""
    query_positions: Tensor
    positions: Tensor
    """[n] logical positions of the scored live tokens (oldest first)."""
    num_new_tokens: int
    protect_from_position: int
    """Pages holding this position or newer are never freed (unscored tokens, the page being written)."""
    num_tokens: int
    """Logical tokens in the request's cache when the step began (evicted ones included)."""
    plan: PagePlan | None = None
    """The pages to free, once computed."""
    resumable: bool = False
    """Begun at a boundary a later request can resume from: a canonical history, every query so far
    taken by this step, nothing cached beyond it, and the boundary on the interval and page grids."""
    restored: bool = False
    """Replayed from a snapshot (computed by the request that recorded it): nothing to record again."""

    @property
    def is_current(self) -> bool:
        """Whether its request still waits for it (not finished, nor reset since it began)."""
        return self.mem.step is self

    def finish(self) -> StepOutcome:
        """Record the computed plan in the request's memory (engine thread); the request may begin
        its next step."""
        if self.plan is None or not self.is_current:
            raise RuntimeError(f"eviction step of {self.req_id!r} finished before it was computed, or twice")
        mem, plan = self.mem, self.plan
        mem.evicted_pages.update(plan.free_pages)
        mem.steps += 1
        mem.step = None
        return StepOutcome(plan.free_pages, sum(plan.requested), sum(plan.realised))


def begin_step(
    mem: RequestMemory, reader: CacheReader, hop: int = 16, req_id: str = "", interval: int | None = None
) -> EvictionStep:
    """Begin ``mem``'s next step: take the oldest unscored queries, as many as make whole ``interval`` s
    (all whole STFT hops when less than one interval is unscored: the prompt's tail), and fix the
    tokens they have seen.

    Why whole intervals: the scheduler caps prompt chunks at ``interval`` tokens, but a chunk also
    gets whatever token budget the batch's other requests leave (509 tokens beside 3 decodes), so
    a step over "everything unscored" would end at positions that depend on who else was running.
    Ending every step on the grid (512, 1024, ...) makes the decisions independent of batching:
    tokens after the step's last query wait for the next step (the chunk's tail queries already
    ran against the not-yet-evicted cache). Whole intervals, not one: with a lag, several
    intervals arrive while a step is pending, and a one-interval step would fall behind.
    """
    if mem.step is not None:
        raise RuntimeError(f"request {req_id!r} already has an eviction step in flight")
    n_q = (mem.num_unscored // hop) * hop
    if interval is not None and n_q >= interval:
        n_q = (n_q // interval) * interval
    if n_q == 0:
        raise ValueError("begin_step needs at least one STFT hop of unscored queries")
    queries, qpos = mem.take_queries(n_q)
    last = int(qpos[-1])
    positions = mem.live_positions()
    positions = positions[positions <= last]
    step = EvictionStep(
        mem=mem,
        reader=reader,
        req_id=req_id,
        queries=queries,
        query_positions=qpos,
        positions=positions,
        num_new_tokens=last + 1 - mem.scored_tokens,
        protect_from_position=min(last + 1, mem.num_tokens - 1),
        num_tokens=mem.num_tokens,
    )
    mem.scored_tokens = last + 1
    mem.step = step
    step.resumable = (
        mem.canonical
        and not mem.query_positions
        and last + 1 == mem.num_tokens
        and interval is not None
        and (last + 1) % interval == 0
        and (last + 1) % mem.block_size == 0
    )
    return step


def eviction_step(
    mem: RequestMemory,
    config: EvictionConfig,
    read_keys: Callable[[int, list[int]], Tensor] | CacheReader,
    scale: float,
    hop: int = 16,
    kv_heads: int = 1,
    device: torch.device | str = "cpu",
) -> StepOutcome:
    """One synchronous step of one request, its whole life cycle. ``read_keys(layer, live_pages)``
    (or a :class:`~vllm_namm.cache_reader.CacheReader`) gives that layer's cached keys of the live
    pages, [n_live(+ padding), kv_heads, d], in page order."""
    if callable(read_keys):
        pages = mem.live_pages
        fn = read_keys
        reader: CacheReader = KeysReader(lambda layer: fn(layer, pages))
    else:
        reader = read_keys
    step = begin_step(mem, reader, hop, interval=config.interval)
    compute_steps([step], config, scale, kv_heads, device)
    return step.finish()


__all__ = [
    "CacheReader",
    "EvictionStep",
    "KeysReader",
    "PagedCacheReader",
    "PeerStepError",
    "RequestMemory",
    "StepOutcome",
    "begin_step",
    "compute_steps",
    "eviction_step",
]
