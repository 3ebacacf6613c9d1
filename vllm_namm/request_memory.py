"""Per-request eviction state of the paged engine, free of vLLM imports.

The vLLM glue (:mod:`vllm_namm.vllm_patch.runner`) feeds each request's queries in as the
model runs; every ``interval`` queries (and once at the end of the prompt) a request is due
for an eviction step, which decides which logical pages to free. Everything here is plain
torch so that it is unit-testable without an engine.

A step comes in three parts, so that the expensive middle one can run off the critical path
(:mod:`vllm_namm.background`) and cover every request due at the same engine step at once:

1. :func:`begin_step` (engine thread): take the request's due queries and fix what the step
   covers: the *scored* tokens, i.e. the live tokens the step's queries have seen. Tokens
   newer than the last query (the tail of a prompt chunk that is not a whole STFT hop) wait
   for the next step, exactly as in evo-memory, which never scores a token no query attended.
2. :func:`compute_steps` (any thread): attention columns layer by layer, each policy's
   per-layer work, then ONE scoring call per policy for every (request, layer, KV head), the
   token keep masks and the page plan of each request. It touches only the jobs' own policy
   states and reads the paged cache through each job's :class:`CacheReader`.
3. :func:`finish_step` (engine thread): record the freed pages.

Decode-time queries: we keep the last unscored queries of every layer (at most
``interval + 15`` of them) and recompute their attention columns from the paged keys at
the step. For Llama-3-8B shapes that is 512 x 32 heads x 128 x 2 B = 4 MiB per layer and
request; the alternative (incremental spectrograms) would need the softmax normaliser of
every past query against keys that may since have been evicted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from vllm_namm import kernels
from vllm_namm.config import EvictionConfig, FeatureConfig
from vllm_namm.features import attention_columns
from vllm_namm.page_plan import (
    PagePlan,
    PagesByBudget,
    PagesByRule,
    PageVotes,
    Reduce,
    budget_votes,
    reduce_votes,
    rule_votes,
)
from vllm_namm.policies import (
    EvictionPolicy,
    LayerView,
    PolicyState,
    protect,
    protected_mask,
)
from vllm_namm.policies.namm import PagedFeatures


@dataclass
class StepOutcome:
    """What one eviction step of one request did (for logs and /metrics)."""

    freed_pages: list[int]
    requested_token_evictions: int
    realised_token_evictions: int


class CacheReader(Protocol):
    """How a step reads one request's cached keys; the engine binds it to a snapshot of the
    request's live block ids, so it stays valid while the engine moves on."""

    def keys(self, layer: int) -> Tensor:
        """Cached keys of the live pages, [n_live_tokens (+ padding of the last page), kv_heads, d]."""
        ...

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        """Attention columns [kv_heads, n_q, n] straight from the cache, or None (then: from keys)."""
        ...

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        """The fused STFT+EMA source for NAMM (GPU), or None."""
        ...


@dataclass
class KeysReader:
    """A :class:`CacheReader` over a function ``read_keys(layer)`` (tests, reference checks)."""

    read_keys: Callable[[int], Tensor]

    def keys(self, layer: int) -> Tensor:
        return self.read_keys(layer)

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        return None

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        return None


@dataclass
class PagedCacheReader:
    """A :class:`CacheReader` over a paged KV cache (the engine's), bound to a snapshot of one
    request's live block ids. ``layers[l]`` = (cache tensor, :class:`~vllm_namm.kernels.PagedKeyLayout`).

    ``fused``: NAMM's spectral features come from the fused paged STFT+EMA kernel (Triton on
    GPU; window 32 / hop 16 only), which never materialises the attention columns.
    """

    layers: list[tuple[Tensor, Any]]
    blocks: Tensor
    """[n_live_pages] int64 physical block ids, oldest page first."""
    scale: float
    backend: kernels.Backend = "auto"
    fused: bool = False

    def _blocks(self, cache: Tensor) -> Tensor:
        return self.blocks.to(cache.device)

    def keys(self, layer: int) -> Tensor:
        cache, layout = self.layers[layer]
        return kernels.gather_keys(cache, layout, self._blocks(cache))

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        cache, layout = self.layers[layer]
        dev = cache.device
        return kernels.attention_columns_paged(
            queries.to(dev),
            cache,
            layout,
            self._blocks(cache),
            positions.to(dev),
            query_positions.to(dev),
            self.scale,
            backend=self.backend,
        )

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        if not self.fused:
            return None
        cache, layout = self.layers[layer]
        dev = cache.device
        q, qpos, pos, blocks = (
            queries.to(dev),
            query_positions.to(dev),
            positions.to(dev),
            self._blocks(cache),
        )

        def features(
            prev_pad: Tensor, prev_ema: Tensor, first: Tensor, cfg: FeatureConfig
        ) -> tuple[Tensor, Tensor]:
            return kernels.paged_spectrogram_ema(
                q,
                cache,
                layout,
                blocks,
                pos,
                qpos,
                self.scale,
                prev_pad,
                prev_ema,
                first.to(dev),
                cfg.gamma,
                backend=self.backend,
                n_fft=cfg.n_w,
                hop=cfg.s_w,
            )

        return features


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
    scored_tokens: int = 0
    """Tokens [0, scored_tokens) have been through a step (policy states track the live ones)."""
    queries: list[list[Tensor]] = field(default_factory=list)
    """Per layer: unscored query chunks [n, q_heads, d], oldest first."""
    query_positions: list[Tensor] = field(default_factory=list)
    states: list[PolicyState] = field(default_factory=list)
    steps: int = 0
    pending: bool = False
    """A step was begun and not finished yet (computing off the critical path)."""

    def __post_init__(self) -> None:
        self.queries = [[] for _ in range(self.num_layers)]
        self.states = [self.policy.new_state(params=self.params) for _ in range(self.num_layers)]

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
        if self.policy.name == "none" or self.pending:
            return False
        n = self.num_unscored
        prompt_tail = self.num_tokens >= prompt_len and prompt_len - self.scored_tokens >= hop
        return n >= interval or (prompt_tail and n >= hop)


@dataclass
class StepJob:
    """One request's due step, fixed by :func:`begin_step` (see the module docstring)."""

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


@dataclass
class StepResult:
    job: StepJob
    plan: PagePlan


def begin_step(
    mem: RequestMemory,
    reader: CacheReader,
    hop: int = 16,
    req_id: str = "",
    interval: int | None = None,
) -> StepJob:
    """Take the oldest unscored queries, as many as make whole ``interval`` s (all whole STFT hops
    when less than one interval is unscored: the prompt's tail), and fix the tokens they have seen.

    Why whole intervals: the scheduler caps prompt chunks at ``interval`` tokens, but a chunk also
    gets whatever token budget the batch's other requests leave (509 tokens beside 3 decodes), so
    a step over "everything unscored" would end at positions that depend on who else was running.
    Ending every step on the grid (512, 1024, ...) makes the decisions independent of batching:
    tokens after the step's last query wait for the next step (the chunk's tail queries already
    ran against the not-yet-evicted cache). Whole intervals, not one: with a lag, several
    intervals arrive while a step is pending, and a one-interval step would fall behind.
    """
    n_q = (mem.num_unscored // hop) * hop
    if interval is not None and n_q >= interval:
        n_q = (n_q // interval) * interval
    if n_q == 0:
        raise ValueError("begin_step needs at least one STFT hop of unscored queries")
    queries, qpos = mem.take_queries(n_q)
    last = int(qpos[-1])
    positions = mem.live_positions()
    positions = positions[positions <= last]
    job = StepJob(
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
    mem.pending = True
    return job


def _layer_view(
    job: StepJob,
    layer: int,
    policy: EvictionPolicy,
    scale: float,
    kv_heads: int,
    device: torch.device | str,
) -> LayerView:
    """One layer's view: columns from the reader (or from its keys), or the fused feature source."""
    reader, positions, qpos = job.reader, job.positions, job.query_positions
    n = positions.numel()
    keys = reader.keys(layer)[:n] if policy.needs_keys else None
    attn, paged = None, None
    if policy.needs_attention:
        if policy.accepts_paged_features:
            paged = reader.paged_features(layer, job.queries[layer], qpos, positions)
        if paged is None:
            attn = reader.columns(layer, job.queries[layer], qpos, positions)
            if attn is None:
                k = keys if keys is not None else reader.keys(layer)[:n]
                attn = attention_columns(
                    job.queries[layer].to(k.device),
                    k,
                    qpos.to(k.device),
                    positions.to(k.device),
                    scale,
                )
            attn = attn[..., :n]
    return LayerView(
        attn=attn,
        keys=keys.permute(1, 0, 2) if keys is not None else None,
        positions=positions.to(device).unsqueeze(0).expand(kv_heads, -1),
        query_positions=qpos.to(device),
        num_new_tokens=job.num_new_tokens,
        paged_features=paged,
    )


class PeerStepError(RuntimeError):
    """Another worker of the tensor-parallel group failed this batch: nobody applies it."""


@torch.no_grad()
def compute_steps(
    jobs: list[StepJob],
    config: EvictionConfig,
    scale: float,
    kv_heads: int,
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
    layers: tuple[int, int] | None = None,
) -> list[StepResult]:
    """Score every scored token of every layer of every job; plan each request's freed pages.

    Per layer, the attention columns are computed, handed to the policy's ``prepare`` and
    dropped; then each policy scores all its (request, layer) entries in one
    ``score_prepared`` call. Updates (filters) the jobs' policy states; touches nothing else.

    ``reduce`` (tensor parallel, see :data:`vllm_namm.page_plan.Reduce`): this worker holds
    ``kv_heads`` of every layer's KV heads; the workers agree on every page plan through
    at most three collectives per batch, whatever the number of jobs: whether every worker computed
    its part (a worker whose part failed still takes part, so nobody waits forever, and then
    every worker drops the batch), the summed tallies and the maximal ones
    (:func:`~vllm_namm.page_plan.reduce_votes`). Every worker must call it with the same jobs
    (requests and positions) in the same order. ``layers`` = (first, total) (pipeline
    parallel): the jobs' layers are layers ``first, first + 1, ...`` of ``total``; the plans'
    per-layer statistics then cover all ``total`` layers.
    """
    error: BaseException | None = None
    votes: list[PageVotes] = []
    try:
        votes = _local_votes(jobs, config, scale, kv_heads, device)
        if layers is not None:
            for vote in votes:
                vote.place_layers(*layers)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers have heard of it
        if reduce is None:
            raise
        error = e
    if reduce is not None:
        failed = reduce(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64), "max")
        if error is not None:
            raise error
        if float(failed[0]) > 0:
            raise PeerStepError("an eviction step failed on another tensor-parallel worker")
        reduce_votes(votes, reduce)
    results = []
    for job, vote in zip(jobs, votes, strict=True):
        plan = vote.decide()
        for state in job.mem.states:
            state.filter(plan.token_keep.to(state_device(state, plan.token_keep)))
        results.append(StepResult(job, plan))
    return results


def _local_votes(
    jobs: list[StepJob],
    config: EvictionConfig,
    scale: float,
    kv_heads: int,
    device: torch.device | str,
) -> list[PageVotes]:
    """This worker's per-page tallies of every job (its own KV heads only)."""
    by_policy: dict[int, tuple[EvictionPolicy, list[Any], list[tuple[int, int]]]] = {}
    views: dict[tuple[int, int], LayerView] = {}
    for j, job in enumerate(jobs):
        policy = job.mem.policy
        _, prepared, slots = by_policy.setdefault(id(policy), (policy, [], []))
        for layer in range(job.mem.num_layers):
            view = _layer_view(job, layer, policy, scale, kv_heads, device)
            prepared.append(policy.prepare(view, job.mem.states[layer]))
            view.attn, view.paged_features = (
                None,
                None,
            )  # consumed: free before the next layer
            views[j, layer] = view
            slots.append((j, layer))
    keep: dict[tuple[int, int], Tensor] = {}
    scores_of: dict[tuple[int, int], Tensor] = {}
    for policy, prepared, slots in by_policy.values():
        for slot, scores in zip(slots, policy.score_prepared(prepared), strict=True):
            view = views[slot]
            scores_of[slot] = scores
            keep[slot] = protect(policy.select(scores, view), view, config.protect)
    votes = []
    for j, job in enumerate(jobs):
        mem = job.mem
        layers = range(mem.num_layers)
        masks = [keep[j, layer] for layer in layers]
        policy = mem.policy
        budget = getattr(policy, "budget", None)  # budget policies, and namm ranked under a budget
        if config.selection == "page" and budget is not None:  # whole pages within the budget
            pages = PagesByBudget(
                [scores_of[j, layer] for layer in layers],
                job.positions,
                mem.block_size,
                keep_tokens=budget.size(job.positions.numel(), job.num_tokens),
                aggregate=config.page_score,
                protected_token_mask=protected_mask(views[j, 0], config.protect).any(dim=0),
                protect_from_position=job.protect_from_position,
                keep_masks=masks,
            )
            votes.append(budget_votes(pages))
        else:
            rule = PagesByRule(
                masks,
                job.positions,
                mem.block_size,
                rule=config.page_rule,
                protect_from_position=job.protect_from_position,
            )
            votes.append(rule_votes(rule))
    return votes


def finish_step(result: StepResult) -> StepOutcome:
    """Record a computed step in its request's memory (engine thread)."""
    mem, plan = result.job.mem, result.plan
    mem.evicted_pages.update(plan.free_pages)
    mem.steps += 1
    mem.pending = False
    return StepOutcome(plan.free_pages, sum(plan.requested), sum(plan.realised))


def eviction_step(
    mem: RequestMemory,
    config: EvictionConfig,
    read_keys: Callable[[int, list[int]], Tensor] | CacheReader,
    scale: float,
    hop: int = 16,
    kv_heads: int = 1,
    device: torch.device | str = "cpu",
) -> StepOutcome:
    """One synchronous step of one request: :func:`begin_step`, :func:`compute_steps`,
    :func:`finish_step`. ``read_keys(layer, live_pages)`` (or a :class:`CacheReader`) gives
    that layer's cached keys of the live pages, [n_live(+ padding), kv_heads, d], in page order."""
    if callable(read_keys):
        pages = mem.live_pages
        fn = read_keys
        reader: CacheReader = KeysReader(lambda layer: fn(layer, pages))
    else:
        reader = read_keys
    job = begin_step(mem, reader, hop, interval=config.interval)
    return finish_step(compute_steps([job], config, scale, kv_heads, device)[0])


def state_device(state: PolicyState, fallback: Tensor) -> torch.device:
    """Device of a policy state's tensors (states created lazily have none yet)."""
    for value in vars(state).values():
        if isinstance(value, Tensor):
            return value.device
    return fallback.device
