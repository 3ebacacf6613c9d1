"""Model-runner side of paged eviction (vLLM 0.32 V1 runner: GPUModelRunner and CPUModelRunner).

What it does each step, for requests whose policy is not ``none``:

1. captures every attention layer's queries (a wrapper around ``impl.forward``);
2. after the forward pass, files them per request; when a request has ``interval``
   unscored queries, reads its keys straight from the paged cache, runs
   an :class:`~vllm_namm.request_memory.EvictionStep`, and turns the chosen pages into holes
   (block id 0, vLLM's null block) in this worker's block table;
3. attaches ``(request, logical page, physical block)`` reports to the step's output
   (:mod:`.channel`); the scheduler returns those blocks to the pool;
4. before attention metadata is built, compacts the block table rows that have holes and
   shortens ``seq_lens`` accordingly, so that stock attention backends simply never see the
   evicted pages. Slot mappings keep using the logical table (new tokens are never written
   into a hole) and RoPE positions stay logical.

Several workers: a tensor-parallel rank holds some KV heads of every layer, a pipeline stage
some layers, but all share one block table (the scheduler's). Each rank scores what it holds
and the ranks agree on every page plan through a gloo group of their own (:class:`VoteGroup`;
never vLLM's groups, whose collectives the forward pass issues from the engine thread at the
same time), so all write the same holes; only the rank whose output vLLM returns to the
scheduler reports them. With pipeline stages the holes come ``pp - 1`` steps after the report
(:meth:`NammRunnerState._make_due_holes`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from vllm_namm import kernels
from vllm_namm.background import LaggedExecutor, eviction_cpus
from vllm_namm.config import EvictionConfig
from vllm_namm.request_memory import (
    EvictionStep,
    PagedCacheReader,
    RequestMemory,
    begin_step,
    compute_steps,
)
from vllm_namm.vllm_patch import channel
from vllm_namm.vllm_patch.patching import patch
from vllm_namm.vllm_patch.policy_book import PolicyBook
from vllm_namm.vllm_patch.request_settings import parse_request_settings

logger = logging.getLogger("vllm.namm")

NULL_BLOCK_ID = 0


class NammRunnerState:
    """Eviction state hung on one model runner (one per worker process)."""

    def __init__(self, runner: Any, config: EvictionConfig) -> None:
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        self.runner = runner
        self.config = config
        groups = runner.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise RuntimeError(
                f"vllm-namm: KV eviction supports models with one KV-cache group, this one has {len(groups)}"
            )
        spec = groups[0].kv_cache_spec
        self.block_size: int = spec.block_size
        ctx = runner.compilation_config.static_forward_context
        layers = [(name, mod) for name, mod in ctx.items() if isinstance(mod, Attention)]
        layers.sort(key=lambda item: extract_layer_index(item[0]))
        if not layers:
            raise RuntimeError("vllm-namm: no attention layers found to evict from")
        self.layer_names = [name for name, _ in layers]
        self.layers = [mod for _, mod in layers]
        self.layer_ids = [extract_layer_index(name) for name in self.layer_names]
        if self.layer_ids != list(range(self.layer_ids[0], self.layer_ids[0] + len(self.layer_ids))):
            raise RuntimeError(
                f"vllm-namm: this worker's attention layers are not consecutive: {self.layer_ids}"
            )
        first = self.layers[0]
        for mod in self.layers:
            if (
                getattr(mod.impl, "sliding_window", None) not in (None, -1)
                or getattr(mod.impl, "alibi_slopes", None) is not None
            ):
                raise RuntimeError(
                    "vllm-namm: models with sliding-window or ALiBi attention are not supported with "
                    "--kv-eviction (compacting the cache would change in-kernel distances)"
                )
        self.scale: float = float(first.impl.scale)
        self.num_kv_heads: int = first.num_kv_heads
        self.head_size: int = first.head_size
        self.backend = type(first.impl).__name__
        self.device = runner.device
        self.book = PolicyBook(config)
        self.book.default  # noqa: B018 - built now: a bad weights file fails at start-up, not mid-request
        self.requests: dict[str, RequestMemory] = {}
        self.captured: list[torch.Tensor | None] = [None] * len(self.layers)
        self.capturing = False
        side = kernels.resolve_backend(config.kernels, key_layout(first, self.backend)[0])
        self.fused_features = side == "triton"
        """The fused paged STFT+EMA kernel (GPU) for the policies that accept it (NAMM, window 32 / hop 16)."""
        self.votes = VoteGroup.create()
        self.reporter = is_reporting_rank()
        engine_cpus = os.sched_getaffinity(0)
        worker_cpus, self.total_layers = engine_cpus, len(self.layers)
        self.hole_delay = 0
        self._deferred: list[tuple[int, EvictionStep, list[tuple[int, int]]]] = []
        if self.votes is not None:
            # every rank's worker cores are taken: the eviction thread goes where none of them runs
            peers = self.votes.gather((sorted(engine_cpus), self.layer_ids[-1] + 1))
            worker_cpus = {c for cpus_of_peer, _ in peers for c in cpus_of_peer}
            self.total_layers = max(end for _, end in peers)
            self.hole_delay = self.votes.stages - 1
        cpus = eviction_cpus(worker_cpus) if self.device.type == "cpu" else None
        self.executor: LaggedExecutor[EvictionStep, EvictionStep] = LaggedExecutor(
            self._compute, config.lag, device=self.device, cpus=cpus
        )
        for idx, mod in enumerate(self.layers):
            _wrap_impl_forward(mod, idx, self)
        logger.info(
            "vllm-namm: %s eviction on %d layers (block %d, interval %d, attention backend %s, feature kernels %s%s; "
            "decisions applied %d engine steps later%s%s)",
            config.policy,
            len(self.layers),
            self.block_size,
            config.interval,
            self.backend,
            side,
            ", fused paged STFT" if self.fused_features and self.book.default.accepts_paged_features else "",
            config.lag,
            f" from a thread on CPUs {sorted(cpus)} (engine thread on {sorted(engine_cpus)})"
            if config.lag and cpus
            else "",
            f"; {self.votes.size} workers (tensor parallel {self.votes.size // self.votes.stages}, pipeline "
            f"{self.votes.stages}): rank {self.votes.rank} holds {self.num_kv_heads} KV heads of layers "
            f"{self.layer_ids[0]}-{self.layer_ids[-1]} of {self.total_layers}, page plans agreed over a gloo group"
            f"{', reports freed blocks' if self.reporter else ''}"
            if self.votes is not None
            else "",
        )

    # ---- bookkeeping around a step -------------------------------------------------------
    def before_step(self, scheduler_output: Any) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
        for req_id in scheduler_output.preempted_req_ids or ():
            self.requests.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            self._track(new.req_id, new.sampling_params, new.num_computed_tokens)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None) or ()
        for i, req_id in enumerate(cached.req_ids):
            if req_id in resumed:  # recomputed from scratch after preemption: state starts over
                state = self.runner.requests.get(req_id)
                self._track(
                    req_id,
                    state.sampling_params if state else None,
                    cached.num_computed_tokens[i],
                )
        self.capturing = bool(self.requests)
        self.captured = [None] * len(self.layers)

    def _track(self, req_id: str, sampling_params: Any, num_computed_tokens: int) -> None:
        """Start (or restart) eviction bookkeeping of a request that enters the batch."""
        self.requests.pop(req_id, None)
        try:
            settings = parse_request_settings(sampling_params.extra_args if sampling_params else None)
            policy = self.book.policy(settings)
            if not policy.evicts:
                return
            options = settings.state_options()
            params = options.pop("params", None)
            self.requests[req_id] = RequestMemory(
                policy,
                len(self.layers),
                self.block_size,
                params=None if params is None else torch.tensor(params),
                state_options=options,
                # A prefix-cache hit brings tokens no policy has seen: they are all "new" to it.
                num_tokens=num_computed_tokens,
                scored_tokens=0,
            )
        except ValueError as e:  # validated at the API server already; never kill the engine
            logger.error("vllm-namm: request %s runs without eviction: %s", req_id, e)

    def compaction_rows(self) -> dict[int, int]:
        """Rows of the persistent batch whose block table has holes -> number of holes."""
        batch = self.runner.input_batch
        rows: dict[int, int] = {}
        for req_id, mem in self.requests.items():
            if mem.evicted_pages:
                row = batch.req_id_to_index.get(req_id)
                if row is not None:
                    rows[row] = len(mem.evicted_pages)
        return rows

    def after_forward(self, scheduler_output: Any) -> None:
        """File this step's queries per request; start the steps that are due (all in one batch);
        apply the decisions whose lag has passed."""
        if self.capturing:
            runner = self.runner
            batch = runner.input_batch
            num_reqs = batch.num_reqs
            qsl = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
            jobs = []
            for row, req_id in enumerate(batch.req_ids[:num_reqs]):
                mem = self.requests.get(req_id)
                if mem is None:
                    continue
                n = scheduler_output.num_scheduled_tokens.get(req_id, 0)
                if n == 0 or any(q is None for q in self.captured):
                    continue
                start = int(batch.num_computed_tokens_cpu[row])
                mem.add_queries([q[qsl[row] : qsl[row] + n] for q in self.captured], start)  # type: ignore[index]
                hop = mem.policy.hop
                if mem.due(self.config.interval, runner.requests[req_id].num_prompt_tokens, hop):
                    jobs.append(
                        begin_step(
                            mem,
                            self._reader(row, mem),
                            hop,
                            req_id,
                            self.config.interval,
                        )
                    )
            self.captured = [None] * len(self.layers)
            self.executor.submit(jobs)
        self.executor.step()
        self._make_due_holes()
        for future in self.executor.due():
            self._apply(future)

    # ---- the eviction itself ---------------------------------------------------------------
    def _reader(self, row: int, mem: RequestMemory) -> PagedCacheReader:
        """Read access to a request's live pages, fixed now (the batch row may move later)."""
        table = self.runner.input_batch.block_table[0].block_table.np
        blocks = torch.from_numpy(table[row, mem.live_pages].astype("int64"))
        return PagedCacheReader(
            [key_layout(mod, self.backend) for mod in self.layers],
            blocks,
            self.scale,
            backend=self.config.kernels,
            fused=self.fused_features,
        )

    def _compute(self, jobs: list[EvictionStep]) -> list[EvictionStep]:
        reduce = self.votes.reduce if self.votes is not None else None
        return compute_steps(
            jobs,
            self.config,
            self.scale,
            self.num_kv_heads,
            self.device,
            reduce=reduce,
            layers=(self.layer_ids[0], self.total_layers),
        )

    def _apply(self, future: Any) -> None:
        """Report computed decisions and turn them into holes (engine thread).

        With pipeline parallelism the holes come ``pp - 1`` steps after the report
        (:attr:`hole_delay`): see :meth:`_make_due_holes`.
        """
        error = future.exception()
        if error is not None:  # never take the engine down: those requests stop evicting
            logger.error(
                "vllm-namm: an eviction step failed; the requests concerned keep their cache: %r",
                error,
            )
            return
        for step in future.result():
            req_id = step.req_id
            if self.requests.get(req_id) is not step.mem:
                continue  # finished, aborted or preempted (state reset) since the step began
            # The runner's own copy of the block ids: the request may be out of this step's batch
            # (not scheduled, e.g. every other step under pipeline parallelism); its table row is
            # rebuilt from these ids when it comes back.
            block_ids = self.runner.requests[req_id].block_ids[0]
            plan = step.plan
            assert plan is not None
            freed = []
            for page in plan.free_pages:
                block_id = int(block_ids[page])
                if block_id == NULL_BLOCK_ID:
                    raise RuntimeError(f"vllm-namm: page {page} of {req_id} evicted twice")
                freed.append((page, block_id))
            if self.reporter:  # the other ranks' outputs never reach the scheduler
                channel.post(
                    req_id,
                    freed,
                    sum(plan.requested),
                    sum(plan.realised),
                    step.num_tokens,
                )
            if self.hole_delay:
                self._deferred.append((self.executor.now + self.hole_delay, step, freed))
            else:
                self._make_holes(step, freed)

    def _make_due_holes(self) -> None:
        """Holes whose delay has passed (pipeline parallel only).

        Why a delay: with ``pp`` stages vLLM keeps ``pp`` batches in flight, so the scheduler
        has already scheduled the next ``pp - 1`` steps when it reads a report. A forward pass
        of those steps must not see the holes yet: the blocks it completes were registered in
        the prefix cache when they were scheduled, before the scheduler learnt that this
        request evicts (after which it registers none), so they must hold the unpruned
        context's KV. The freed blocks themselves cannot be reused before step ``s + pp``
        either (they return to the pool with the report), and until then they still hold
        this request's keys.
        """
        while self._deferred and self._deferred[0][0] <= self.executor.now:
            _, step, freed = self._deferred.pop(0)
            if self.requests.get(step.req_id) is step.mem:
                self._make_holes(step, freed)

    def _make_holes(self, step: EvictionStep, freed: list[tuple[int, int]]) -> None:
        """Null the freed pages in this worker's block table and finish the step."""
        req_id = step.req_id
        batch = self.runner.input_batch
        table = batch.block_table[0].block_table.np
        row = batch.req_id_to_index.get(req_id)  # None: not scheduled this step (rebuilt from block_ids)
        block_ids = self.runner.requests[req_id].block_ids[0]
        for page, block_id in freed:
            if block_ids[page] != block_id or (row is not None and int(table[row, page]) != block_id):
                raise RuntimeError(
                    f"vllm-namm: page {page} of {req_id} changed blocks before its hole was made"
                )
            block_ids[page] = NULL_BLOCK_ID
            if row is not None:
                table[row, page] = NULL_BLOCK_ID
        step.finish()
        if freed:
            logger.debug("vllm-namm: %s freed pages %s", req_id, [page for page, _ in freed])


class VoteGroup:
    """The workers of one engine (tensor x pipeline parallel ranks) as a gloo group of our own,
    for page votes.

    Why not vLLM's groups: their collectives are issued by the forward pass on the engine
    thread while ours run on the eviction thread, and two threads interleaving collectives on
    one communicator deadlock. A separate group only has to see the same collectives in the
    same order on every rank, which it does: every rank submits the same batches of jobs (the
    same scheduler outputs) in the same order, and :func:`compute_steps` issues a fixed
    sequence of collectives per batch.
    """

    def __init__(self, group: Any, rank: int, size: int, stages: int) -> None:
        self.group = group
        self.rank = rank
        self.size = size
        self.stages = stages

    @classmethod
    def create(cls) -> VoteGroup | None:
        """This rank's group (None for a single worker). Only its members call it
        (``use_local_synchronization``), all at KV-cache initialisation, so data-parallel
        replicas need not take part."""
        import torch.distributed as dist
        from vllm.distributed.parallel_state import (
            get_pp_group,
            get_tp_group,
            model_parallel_is_initialized,
        )

        if not model_parallel_is_initialized():
            return None
        tp, pp = get_tp_group(), get_pp_group()
        if tp.world_size * pp.world_size == 1:
            return None
        # vLLM lays ranks out as [..., PP, TP]: stage s's TP ranks are s's PP-group rank's TP neighbours
        ranks = sorted(p - tp.rank_in_group + j for p in pp.ranks for j in range(tp.world_size))
        group = dist.new_group(
            ranks,
            backend="gloo",
            use_local_synchronization=True,
            group_desc="vllm_namm_page_votes",
        )
        return cls(group, ranks.index(dist.get_rank()), len(ranks), pp.world_size)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``t`` over the ranks (``op``: sum or max); gloo works on CPU tensors."""
        import torch.distributed as dist

        out = t.detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(
            out,
            op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
            group=self.group,
        )
        return out.to(t.device)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered


def is_reporting_rank() -> bool:
    """Whether vLLM returns this rank's ModelRunnerOutput to the scheduler: the first TP rank of
    the last pipeline stage (``MultiprocExecutor._get_output_rank`` in vLLM 0.32)."""
    from vllm.distributed.parallel_state import (
        get_pp_group,
        get_tp_group,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        return True
    return get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank


def key_layout(layer: Any, backend: str) -> tuple[torch.Tensor, kernels.PagedKeyLayout]:
    """The paged key layout of one attention layer (see :mod:`vllm_namm.kernels`).

    CPU_ATTN packs keys per ISA (``vec``: transposed inside a block; ``amx``: VNNI tiles),
    FlashAttention-style backends keep ``[num_blocks, kv_heads, block_size, 2 * head_size]``.
    """
    kv_cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
    if backend.startswith("CPU"):
        return kv_cache, kernels.PagedKeyLayout.cpu(kv_cache, getattr(layer, "isa", "vec"))
    return kv_cache, kernels.PagedKeyLayout.flash(kv_cache, layer.head_size)


def _wrap_impl_forward(layer: Any, idx: int, state: NammRunnerState) -> None:
    @patch(layer.impl, "forward")  # this layer's impl only (an instance: original is bound)
    def forward(
        original,
        attn_layer,
        query,
        key,
        value,
        kv_cache,
        attn_metadata,
        output,
        *args,
        **kwargs,
    ):
        result = original(
            attn_layer,
            query,
            key,
            value,
            kv_cache,
            attn_metadata,
            output,
            *args,
            **kwargs,
        )
        if state.capturing and attn_metadata is not None:
            n = attn_metadata.num_actual_tokens
            state.captured[idx] = query[:n].detach().reshape(n, -1, state.head_size).clone()
        return result


# ---- compaction of attention metadata --------------------------------------------------------
_active_compaction: tuple[dict[int, int], int] | None = None
"""(batch row -> holes, block size) while the runner builds attention metadata, else None."""


def compact_metadata(cm: Any, rows: dict[int, int], block_size: int) -> Any:
    """``cm`` with holed block-table rows compacted and their ``seq_lens`` shortened.

    ``rows`` maps a batch row to its number of holes (evicted pages). Holes are always
    whole pages older than the tokens being computed, so the queries stay the last
    ``query_len`` tokens of the shortened sequence and the causal mask is unchanged.
    """
    table = cm.block_table_tensor.clone()
    seq_lens = cm.seq_lens.clone()
    upper = cm.seq_lens_cpu_upper_bound.clone() if cm.seq_lens_cpu_upper_bound is not None else None
    for row, holes in rows.items():
        if row >= table.shape[0]:
            continue
        n_pages = -(-int(seq_lens[row]) // block_size)
        ids = table[row, :n_pages]
        live = ids[ids != NULL_BLOCK_ID]
        if n_pages - live.numel() != holes:
            raise RuntimeError(
                f"vllm-namm: block-table row {row} has {n_pages - live.numel()} holes, expected {holes}"
            )
        table[row, : live.numel()] = live
        table[row, live.numel() : n_pages] = NULL_BLOCK_ID
        seq_lens[row] -= holes * block_size
        if upper is not None:
            upper[row] -= holes * block_size
    return cm.replace(
        block_table_tensor=table,
        seq_lens=seq_lens,
        seq_lens_cpu_upper_bound=upper,
        max_seq_len=int(seq_lens[: cm.num_reqs].max()) if cm.num_reqs else cm.max_seq_len,
        _num_computed_tokens_cache=None,
    )


def install() -> None:
    """Wrap the runner and AttentionGroup methods (dormant unless a runner enables eviction)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    @patch(GPUModelRunner, "initialize_kv_cache")
    def initialize_kv_cache(original, self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        from vllm_namm.vllm_patch.engine_config import eviction_config

        cfg = eviction_config(self.vllm_config)
        if cfg is not None and not kwargs.get("is_profiling", False):
            self._namm = NammRunnerState(self, cfg)
        return result

    @patch(GPUModelRunner, "execute_model")
    def execute_model(original, self, scheduler_output, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None:
            return original(self, scheduler_output, *args, **kwargs)
        namm.before_step(scheduler_output)
        result = original(self, scheduler_output, *args, **kwargs)
        namm.after_forward(scheduler_output)
        namm.capturing = False
        return channel.attach(result)

    @patch(GPUModelRunner, "sample_tokens")
    def sample_tokens(original, self, *args, **kwargs):
        return channel.attach(original(self, *args, **kwargs))

    @patch(GPUModelRunner, "_build_attention_metadata")
    def _build_attention_metadata(original, self, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None or kwargs.get("for_cudagraph_capture"):
            return original(self, *args, **kwargs)
        global _active_compaction
        rows = namm.compaction_rows()
        _active_compaction = (rows, namm.block_size) if rows else None
        try:
            return original(self, *args, **kwargs)
        finally:
            _active_compaction = None

    @patch(AttentionGroup, "build_metadata")
    def build_metadata(original, self, common_attn_metadata, *args, **kwargs):
        if _active_compaction is not None:
            common_attn_metadata = compact_metadata(common_attn_metadata, *_active_compaction)
        return original(self, common_attn_metadata, *args, **kwargs)
