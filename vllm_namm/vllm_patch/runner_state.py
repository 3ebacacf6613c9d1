"""The eviction state of one model runner (one per worker process), and what it does each step.

Eviction frees pages in the KV-cache groups of plain full attention (:mod:`.kv_groups`: one group
for a plain model, the full-attention groups of a hybrid one, one group per layer with per-layer
pages); each such group of each request has its own
:class:`~vllm_namm.request_memory.RequestMemory` over the group's layers, so its own page plans,
holes and compaction. For requests whose policy evicts, each engine step:

1. :meth:`NammRunnerState.before_step`: tracks the requests that enter or leave the batch (one
   memory per evicted group each) and arms the query capture
   (:class:`~vllm_namm.vllm_patch.attention_layers.AttentionLayers`, evicted layers only);
2. :meth:`NammRunnerState.after_forward`: files the step's queries per request and group; when a
   memory has ``interval`` unscored queries, begins its :class:`~vllm_namm.request_memory.EvictionStep`
   (bound to a snapshot of the group's live block ids) and submits every step begun now, as one
   batch, to the lagged executor (:mod:`vllm_namm.background`); then applies the batches whose lag
   has passed: reports ``(request, group, logical page, physical block)`` through the
   :class:`~vllm_namm.vllm_patch.channel.Outbox` (the scheduler returns those blocks to the pool) and
   turns them into holes (:class:`~vllm_namm.vllm_patch.holes.Holes`);
3. :meth:`NammRunnerState.compaction`: before attention metadata is built, which rows of which
   group have holes.

Eviction-aware prefix caching (:mod:`vllm_namm.step_snapshots`; with one KV-cache group only,
:func:`~vllm_namm.vllm_patch.engine_config.snapshots_possible`): when a resumable step is applied,
its request's state at the step's boundary is kept as a snapshot and announced on the report; a
request the scheduler resumes from a snapshot gets that state back as it enters the batch (and the
snapshot's pending step, applied after the same number of engine steps as in the recording request).

Several workers: a tensor-parallel rank holds some KV heads of every layer, a pipeline stage
some layers, but all share one block table (the scheduler's). Each rank scores what it holds
and the ranks agree on every page plan through a gloo group of their own
(:class:`~vllm_namm.vllm_patch.votes.VoteGroup`), so all write the same holes; only the rank whose
output vLLM returns to the scheduler reports them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future
from typing import Any

import torch

from vllm_namm import kernels
from vllm_namm.background import LaggedExecutor, eviction_cpus
from vllm_namm.config import EvictionConfig
from vllm_namm.layer_budgets import layer_budget_scales
from vllm_namm.request_memory import EvictionStep, PagedCacheReader, RequestMemory, begin_step, compute_steps
from vllm_namm.step_snapshots import SnapshotStore, StepSnapshot
from vllm_namm.vllm_patch import channel
from vllm_namm.vllm_patch.attention_layers import AttentionLayers
from vllm_namm.vllm_patch.channel import Outbox, SnapshotNote
from vllm_namm.vllm_patch.engine_config import snapshots_possible
from vllm_namm.vllm_patch.holes import Compaction, Holes
from vllm_namm.vllm_patch.kv_groups import evicted_groups
from vllm_namm.vllm_patch.policy_book import PolicyBook
from vllm_namm.vllm_patch.request_settings import parse_request_settings
from vllm_namm.vllm_patch.votes import VoteGroup, is_reporting_rank

logger = logging.getLogger("vllm.namm")


class NammRunnerState:
    """Eviction state hung on one model runner (one per worker process)."""

    def __init__(self, runner: Any, config: EvictionConfig) -> None:
        self.runner = runner
        self.config = config
        kv_groups = runner.kv_cache_config.kv_cache_groups
        self.groups: list[int] = evicted_groups(runner.kv_cache_config)
        """The KV-cache groups eviction frees pages in (one memory per request and group)."""
        self.layers = AttentionLayers(runner, {n for g in self.groups for n in kv_groups[g].layer_names})
        position = {name: i for i, name in enumerate(self.layers.names)}
        self.group_layers: list[list[int]] = [
            sorted(position[n] for n in kv_groups[g].layer_names if n in position) for g in self.groups
        ]
        """Per evicted group: its layers' indices in :attr:`layers` (this worker's)."""
        self.block_sizes: list[int] = [kv_groups[g].kv_cache_spec.block_size for g in self.groups]
        self.budget_scales = layer_budget_scales(config.layer_budget, len(self.groups))
        if len(kv_groups) > 1:
            _no_shared_metadata(runner, self.groups)
        self.device = runner.device
        self.book = PolicyBook(config)
        self.book.default  # noqa: B018 - built now: a bad weights file fails at start-up, not mid-request
        self.requests: dict[str, list[RequestMemory]] = {}
        """Per tracked request: one memory per evicted group, in :attr:`groups` order."""
        self.outbox = Outbox()
        self.snapshots = SnapshotStore()
        self.snapshotting = config.prefix_cache_mib > 0 and snapshots_possible(
            runner.vllm_config, runner.kv_cache_config
        )
        """Whether resumable steps leave snapshots (the scheduler keeps records of them under the same conditions)."""
        side = kernels.resolve_backend(config.kernels, self.layers.key_layouts()[0][0])
        self.fused = side == "triton"
        """The fused paged STFT+EMA kernel (GPU) for the policies that accept it (NAMM, window 32 / hop 16)."""
        self.votes = VoteGroup.create()
        self.reporter = is_reporting_rank()
        engine_cpus = os.sched_getaffinity(0)
        worker_cpus = engine_cpus
        delay = 0
        if self.votes is not None:
            # every rank's worker cores are taken: the eviction thread goes where none of them runs
            peers = self.votes.gather(sorted(engine_cpus))
            worker_cpus = {c for cpus_of_peer in peers for c in cpus_of_peer}
            delay = self.votes.stages - 1
        self.holes = Holes(runner, delay)
        cpus = eviction_cpus(worker_cpus) if self.device.type == "cpu" else None
        self.executor: LaggedExecutor[EvictionStep, EvictionStep] = LaggedExecutor(
            self._compute, config.lag, device=self.device, cpus=cpus
        )
        self._log_start(side, engine_cpus, cpus, len(kv_groups))

    # ---- bookkeeping around a step -------------------------------------------------------
    def before_step(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.requests.pop(req_id, None)
        restores, drops = channel.received(scheduler_output)
        for new in scheduler_output.scheduled_new_reqs:
            self._track(new.req_id, new.sampling_params, new.num_computed_tokens, restores.get(new.req_id))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        for i, req_id in enumerate(cached.req_ids):
            if req_id in resumed:  # recomputed from scratch after preemption: state starts over
                state = self.runner.requests.get(req_id)
                self._track(
                    req_id,
                    state.sampling_params if state else None,
                    cached.num_computed_tokens[i],
                    restores.get(req_id),
                )
        self.snapshots.drop(drops)
        self.layers.start(capturing=bool(self.requests))

    def _track(
        self, req_id: str, sampling_params: Any, num_computed_tokens: int, snapshot_id: int | None = None
    ) -> None:
        """Start (or restart) eviction bookkeeping of a request that enters the batch, from a snapshot
        when the scheduler resumes it from one."""
        self.requests.pop(req_id, None)
        try:
            settings = parse_request_settings(sampling_params.extra_args if sampling_params else None)
            policy = self.book.policy(settings)
            if not policy.evicts:
                return
            options = settings.state_options()
            params = options.pop("params", None)
            vector = None if params is None else torch.tensor(params)
            self.requests[req_id] = [
                RequestMemory(
                    policy,
                    len(layers),
                    block_size,
                    params=vector,
                    state_options=options,
                    # A prefix-cache hit brings tokens no policy has seen: they are all "new" to it.
                    num_tokens=num_computed_tokens,
                    budget_scale=scale,
                    scored_tokens=0,
                    canonical=num_computed_tokens == 0,
                )
                for layers, block_size, scale in zip(
                    self.group_layers, self.block_sizes, self.budget_scales, strict=True
                )
            ]
        except ValueError as e:  # validated at the API server already; never kill the engine
            logger.error("vllm-namm: request %s runs without eviction: %s", req_id, e)
        mems = self.requests.get(req_id)
        if snapshot_id is None:
            return
        snapshot = self.snapshots.get(snapshot_id)
        if mems is None or len(mems) != 1 or snapshot.boundary != num_computed_tokens:
            raise RuntimeError(f"vllm-namm: request {req_id} cannot resume from snapshot {snapshot_id}")
        pending = snapshot.restore(mems[0], req_id)
        if pending is not None:  # as if begun at the end of the previous engine step, as it was
            self.executor.submit_done([pending], self.executor.now - 1)

    def compaction(self) -> dict[int, Compaction]:
        """Per KV-cache group with holes: the rows of the persistent batch whose block table has holes."""
        batch = self.runner.input_batch
        out: dict[int, Compaction] = {}
        for i, group in enumerate(self.groups):
            rows: dict[int, int] = {}
            for req_id, mems in self.requests.items():
                if mems[i].evicted_pages:
                    row = batch.req_id_to_index.get(req_id)
                    if row is not None:
                        rows[row] = len(mems[i].evicted_pages)
            if rows:
                out[group] = Compaction(rows, self.block_sizes[i])
        return out

    def after_forward(self, scheduler_output: Any) -> None:
        """File this step's queries per request; begin the steps that are due (all in one batch);
        apply the decisions whose lag has passed."""
        queries = self.layers.queries() if self.layers.capturing else None
        if self.layers.capturing:
            runner = self.runner
            batch = runner.input_batch
            num_reqs = batch.num_reqs
            qsl = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
            steps = []
            interval = self.config.interval
            for req_id, mems in self.requests.items():  # an engine step without a chunk of it: not canonical
                if scheduler_output.num_scheduled_tokens.get(req_id, 0) != interval:
                    for mem in mems:
                        mem.canonical = False
            for row, req_id in enumerate(batch.req_ids[:num_reqs]):
                mems = self.requests.get(req_id)
                n = scheduler_output.num_scheduled_tokens.get(req_id, 0)
                if mems is None or n == 0 or queries is None:
                    continue
                start = int(batch.num_computed_tokens_cpu[row])
                if start % interval:
                    for mem in mems:
                        mem.canonical = False
                mine = [q[qsl[row] : qsl[row] + n] for q in queries]
                prompt_len = runner.requests[req_id].num_prompt_tokens
                for i, mem in enumerate(mems):
                    mem.add_queries([mine[layer] for layer in self.group_layers[i]], start)
                    hop = mem.policy.hop
                    if mem.due(self.config.interval, prompt_len, hop):
                        reader = self._reader(row, mem, i)
                        steps.append(begin_step(mem, reader, hop, req_id, self.config.interval))
            self.executor.submit(steps)
        self.layers.start(capturing=False)
        self.executor.step()
        self.holes.make_due(self.executor.now, self._waits_for)
        for future in self.executor.due():
            self._apply(future)

    # ---- the eviction itself ---------------------------------------------------------------
    def _reader(self, row: int, mem: RequestMemory, i: int) -> PagedCacheReader:
        """Read access to the live pages of a request's ``i``-th evicted group, fixed now (the batch row
        may move later)."""
        table = self.runner.input_batch.block_table[self.groups[i]].block_table.np
        blocks = torch.from_numpy(table[row, mem.live_pages].astype("int64"))
        return PagedCacheReader(
            self.layers.key_layouts(self.group_layers[i]),
            blocks,
            self.layers.scale,
            backend=self.config.kernels,
            fused=self.fused,
        )

    def _compute(self, steps: list[EvictionStep]) -> list[EvictionStep]:
        reduce = self.votes.reduce if self.votes is not None else None
        return compute_steps(
            steps,
            self.config,
            self.layers.scale,
            self.layers.num_kv_heads,
            self.device,
            reduce=reduce,
        )

    def _group_of(self, step: EvictionStep) -> int | None:
        """Which evicted group (index in :attr:`groups`) the step's memory is, while its request still
        is the one it began for (not finished, aborted or preempted); else None."""
        mems = self.requests.get(step.req_id) or ()
        return next((i for i, mem in enumerate(mems) if mem is step.mem), None)

    def _waits_for(self, step: EvictionStep) -> bool:
        return self._group_of(step) is not None

    def _apply(self, future: Future[list[EvictionStep]]) -> None:
        """Report computed steps and turn them into holes (engine thread)."""
        error = future.exception()
        if error is not None:  # never take the engine down: those requests stop evicting
            logger.error(
                "vllm-namm: an eviction step failed; the requests concerned keep their cache: %r", error
            )
            return
        for step in future.result():
            i = self._group_of(step)
            if i is None:
                continue
            assert step.plan is not None
            group = self.groups[i]
            freed = self.holes.freed_blocks(step, group)
            note = self._snapshot(step)
            if self.reporter:  # the other ranks' outputs never reach the scheduler
                plan = step.plan
                self.outbox.post(
                    step.req_id, freed, sum(plan.requested), sum(plan.realised), step.num_tokens, group, note
                )
            self.holes.make(step, group, freed, self.executor.now)

    def _snapshot(self, step: EvictionStep) -> SnapshotNote | None:
        """Keep the state at the boundary a resumable step began at (every worker, same ids)."""
        if not step.resumable or step.restored or not self.snapshotting:
            return None
        pending = self.config.lag >= 2  # else the step's holes were made within the step that began it
        snapshot = StepSnapshot.take(step, pending)
        snapshot_id = self.snapshots.add(snapshot)
        free = step.plan.free_pages if step.plan is not None else []
        return SnapshotNote(
            snapshot_id,
            snapshot.boundary,
            sorted(snapshot.holes),
            list(free) if pending else [],
            snapshot.nbytes,
        )

    def _log_start(self, side: str, engine_cpus: set[int], cpus: set[int] | None, num_groups: int) -> None:
        config, layers, votes = self.config, self.layers, self.votes
        fused = self.fused and self.book.default.accepts_paged_features
        left = num_groups - len(self.groups)
        logger.info(
            "vllm-namm: %s eviction on %d layers in %d KV-cache group(s)%s (block %d, interval %d, attention "
            "backend %s, feature kernels %s%s; decisions applied %d engine steps later%s%s)",
            config.policy,
            len(layers),
            len(self.groups),
            f" ({config.granularity} pages; {left} sliding-window group(s) left to vLLM)"
            if left
            else f" ({config.granularity} pages)",
            self.block_sizes[0],
            config.interval,
            layers.backend,
            side,
            ", fused paged STFT" if fused else "",
            config.lag,
            f" from a thread on CPUs {sorted(cpus)} (engine thread on {sorted(engine_cpus)})"
            if config.lag and cpus
            else "",
            f"; {votes.size} workers (tensor parallel {votes.size // votes.stages}, pipeline "
            f"{votes.stages}): rank {votes.rank} holds {layers.num_kv_heads} KV heads of layers "
            f"{layers.ids[0]}-{layers.ids[-1]}, page plans agreed over a gloo group"
            f"{', reports freed blocks' if self.reporter else ''}"
            if votes is not None
            else "",
        )


def _no_shared_metadata(runner: Any, groups: list[int]) -> None:
    """Builders of the evicted groups never reuse another group's metadata (vLLM does for groups of one
    spec, swapping only the block table, ``supports_update_block_table``): each group has its own holes,
    so its own compacted ``seq_lens``."""
    for group in groups:
        for attention_group in runner.attn_groups[group]:
            for builder in attention_group.metadata_builders:
                builder.supports_update_block_table = False
