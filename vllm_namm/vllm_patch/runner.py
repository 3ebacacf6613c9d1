"""Model-runner side of paged eviction (vLLM 0.32 V1 runner: GPUModelRunner and CPUModelRunner).

What it does each step, for requests whose policy is not ``none``:

1. captures every attention layer's queries (a wrapper around ``impl.forward``);
2. after the forward pass, files them per request; when a request has ``interval``
   unscored queries, reads its keys straight from the paged cache, runs
   :func:`vllm_namm.paged_memory.eviction_step`, and turns the chosen pages into holes
   (block id 0, vLLM's null block) in this worker's block table;
3. attaches ``(request, logical page, physical block)`` reports to the step's output
   (:mod:`.channel`); the scheduler returns those blocks to the pool;

Tensor parallel: every rank holds some KV heads of every layer, but all share one block table
(the scheduler's). Each rank scores its own heads and the ranks agree on every page plan
through a gloo group of their own (:class:`VoteGroup`; never vLLM's TP group, whose
collectives the forward pass issues from the engine thread at the same time), so all write
the same holes; only the rank whose output vLLM returns to the scheduler reports them.

4. before attention metadata is built, compacts the block table rows that have holes and
   shortens ``seq_lens`` accordingly, so that stock attention backends simply never see the
   evicted pages. Slot mappings keep using the logical table (new tokens are never written
   into a hole) and RoPE positions stay logical.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import torch

from vllm_namm import kernels
from vllm_namm.background import LaggedExecutor, eviction_cpus
from vllm_namm.config import EvictionConfig
from vllm_namm.paged_memory import (
    PagedCacheReader,
    RequestMemory,
    StepJob,
    StepResult,
    begin_step,
    compute_steps,
    finish_step,
)
from vllm_namm.policies import DEFAULT_WEIGHTS, EvictionPolicy, make_policy
from vllm_namm.vllm_patch import channel
from vllm_namm.vllm_patch.request_settings import RequestSettings, parse_request_settings
from vllm_namm.weights import load_weights

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
        first = self.layers[0]
        for mod in self.layers:
            if getattr(mod.impl, "sliding_window", None) not in (None, -1) or getattr(
                mod.impl, "alibi_slopes", None
            ) is not None:
                raise RuntimeError(
                    "vllm-namm: models with sliding-window or ALiBi attention are not supported with "
                    "--kv-eviction (compacting the cache would change in-kernel distances)"
                )
        self.scale: float = float(first.impl.scale)
        self.num_kv_heads: int = first.num_kv_heads
        self.head_size: int = first.head_size
        self.backend = type(first.impl).__name__
        self.device = runner.device
        # Loaded once: any request may ask for namm (or its own EMA coefficient) per request.
        self.weights = load_weights(config.weights or DEFAULT_WEIGHTS)
        self.default_policy = make_policy(config, self.weights)
        self._policies: dict[str, EvictionPolicy] = {}
        self.requests: dict[str, RequestMemory] = {}
        self.captured: list[torch.Tensor | None] = [None] * len(self.layers)
        self.capturing = False
        self.hop = self.weights.features.s_w
        side = kernels.resolve_backend(config.kernels, key_layout(first, self.backend)[0])
        # the fused paged STFT+EMA kernel (GPU) is written for window 32 / hop 16 only
        self.fused_features = side == "triton" and (self.weights.features.n_w, self.hop) == (32, 16)
        self.votes = VoteGroup.create()
        self.reporter = is_reporting_rank()
        engine_cpus = os.sched_getaffinity(0)
        # every rank's worker cores are taken: the eviction thread goes where none of them runs
        worker_cpus = self.votes.union_of(engine_cpus) if self.votes is not None else engine_cpus
        cpus = eviction_cpus(worker_cpus) if self.device.type == "cpu" else None
        self.executor: LaggedExecutor[StepJob, StepResult] = LaggedExecutor(
            self._compute, config.lag, device=self.device, cpus=cpus)
        for idx, mod in enumerate(self.layers):
            _wrap_impl_forward(mod, idx, self)
        logger.info(
            "vllm-namm: %s eviction on %d layers (block %d, interval %d, attention backend %s, feature kernels %s%s; "
            "decisions applied %d engine steps later%s%s)",
            config.policy, len(self.layers), self.block_size, config.interval, self.backend, side,
            ", fused paged STFT" if self.fused_features else "", config.lag,
            f" from a thread on CPUs {sorted(cpus)} (engine thread on {sorted(engine_cpus)})"
            if config.lag and cpus else "",
            f"; tensor parallel: rank {self.votes.rank} of {self.votes.size} holds {self.num_kv_heads} KV heads "
            f"per layer, page plans agreed over a gloo group{', reports freed blocks' if self.reporter else ''}"
            if self.votes is not None else "",
        )

    # ---- per-request policies -------------------------------------------------------------
    def policy_for(self, settings: RequestSettings) -> EvictionPolicy:
        """The request's policy: the server's, or the one its ``vllm_xargs`` ask for.

        A candidate's ``namm_params`` do not make a new policy: they go into the request's
        per-layer states (``NammPolicy.new_state(params=...)``).
        """
        key = settings.cache_key()
        if settings.model_copy(update={"namm_params": None}).is_default:
            return self.default_policy
        if key not in self._policies:
            if len(self._policies) > 64:
                self._policies.clear()
            weights = self.weights
            if settings.namm_ema_coeff_per_step is not None:
                features = weights.features.model_copy(update={"ema_coeff_per_step": settings.namm_ema_coeff_per_step})
                weights = dataclasses.replace(weights, features=features)
            self._policies[key] = make_policy(settings.apply(self.config), weights)
        return self._policies[key]

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
                self._track(req_id, state.sampling_params if state else None, cached.num_computed_tokens[i])
        self.capturing = bool(self.requests)
        self.captured = [None] * len(self.layers)

    def _track(self, req_id: str, sampling_params: Any, num_computed_tokens: int) -> None:
        """Start (or restart) eviction bookkeeping of a request that enters the batch."""
        self.requests.pop(req_id, None)
        try:
            settings = parse_request_settings(sampling_params.extra_args if sampling_params else None)
            policy = self.policy_for(settings)
            if policy.name == "none":
                return
            params = None if settings.namm_params is None else torch.tensor(settings.namm_params)
            self.requests[req_id] = RequestMemory(
                policy, len(self.layers), self.block_size, params=params,
                # A prefix-cache hit brings tokens no policy has seen: they are all "new" to it.
                num_tokens=num_computed_tokens, scored_tokens=0,
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
                if mem.due(self.config.interval, runner.requests[req_id].num_prompt_tokens, self.hop):
                    jobs.append(begin_step(mem, self._reader(row, mem), self.hop, req_id))
            self.captured = [None] * len(self.layers)
            self.executor.submit(jobs)
        self.executor.step()
        for future in self.executor.due():
            self._apply(future)

    # ---- the eviction itself ---------------------------------------------------------------
    def _reader(self, row: int, mem: RequestMemory) -> PagedCacheReader:
        """Read access to a request's live pages, fixed now (the batch row may move later)."""
        table = self.runner.input_batch.block_table[0].block_table.np
        blocks = torch.from_numpy(table[row, mem.live_pages].astype("int64"))
        return PagedCacheReader([key_layout(mod, self.backend) for mod in self.layers], blocks, self.scale,
                                backend=self.config.kernels, fused=self.fused_features)

    def _compute(self, jobs: list[StepJob]) -> list[StepResult]:
        reduce = self.votes.reduce if self.votes is not None else None
        return compute_steps(jobs, self.config, self.scale, self.num_kv_heads, self.device, reduce=reduce)

    def _apply(self, future: Any) -> None:
        """Turn computed decisions into holes and reports (engine thread)."""
        error = future.exception()
        if error is not None:  # never take the engine down: those requests stop evicting
            logger.error("vllm-namm: an eviction step failed; the requests concerned keep their cache: %r", error)
            return
        batch = self.runner.input_batch
        table = batch.block_table[0].block_table.np
        for result in future.result():
            req_id = result.job.req_id
            if self.requests.get(req_id) is not result.job.mem:
                continue  # finished, aborted or preempted (state reset) since the step began
            row = batch.req_id_to_index.get(req_id)
            if row is None:
                continue
            stats = finish_step(result)
            req_state = self.runner.requests[req_id]
            freed = []
            for page in stats.freed_pages:
                block_id = int(table[row, page])
                if block_id == NULL_BLOCK_ID:
                    raise RuntimeError(f"vllm-namm: page {page} of {req_id} evicted twice")
                table[row, page] = NULL_BLOCK_ID
                req_state.block_ids[0][page] = NULL_BLOCK_ID
                freed.append((page, block_id))
            if self.reporter:  # the other ranks' outputs never reach the scheduler
                channel.post(req_id, freed, stats.requested_token_evictions, stats.realised_token_evictions,
                             result.job.num_tokens)
            if freed:
                logger.debug("vllm-namm: %s freed pages %s", req_id, stats.freed_pages)


class VoteGroup:
    """The tensor-parallel ranks of one engine, as a gloo group of our own for page votes.

    Why not vLLM's TP group: its collectives are issued by the forward pass on the engine
    thread while ours run on the eviction thread, and two threads interleaving collectives on
    one communicator deadlock. A separate group only has to see the same collectives in the
    same order on every rank, which it does: every rank submits the same batches of jobs (the
    same scheduler outputs) in the same order, and :func:`compute_steps` issues a fixed
    sequence of collectives per batch.
    """

    def __init__(self, group: Any, rank: int, size: int) -> None:
        self.group = group
        self.rank = rank
        self.size = size

    @classmethod
    def create(cls) -> VoteGroup | None:
        """This rank's group (None without tensor parallelism). Only the TP ranks call it
        (``use_local_synchronization``), all at KV-cache initialisation, so data-parallel
        replicas need not take part."""
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

        if not model_parallel_is_initialized() or get_tp_group().world_size == 1:
            return None
        tp = get_tp_group()
        group = dist.new_group(list(tp.ranks), backend="gloo", use_local_synchronization=True,
                               group_desc="vllm_namm_page_votes")
        return cls(group, tp.rank_in_group, tp.world_size)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``t`` over the ranks (``op``: sum or max); gloo works on CPU tensors."""
        import torch.distributed as dist

        out = t.detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return out.to(t.device)

    def union_of(self, cpus: set[int]) -> set[int]:
        """The union of every rank's ``cpus``."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, sorted(cpus), group=self.group)
        return {c for part in gathered for c in part}


def is_reporting_rank() -> bool:
    """Whether vLLM returns this rank's ModelRunnerOutput to the scheduler: the first TP rank of
    the last pipeline stage (``MultiprocExecutor._get_output_rank`` in vLLM 0.32)."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

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
    impl = layer.impl
    if getattr(impl, "_namm_wrapped", False):
        return
    original = impl.forward

    @functools.wraps(original)
    def forward(attn_layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        result = original(attn_layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if state.capturing and attn_metadata is not None:
            n = attn_metadata.num_actual_tokens
            state.captured[idx] = query[:n].detach().reshape(n, -1, state.head_size).clone()
        return result

    impl.forward = forward
    impl._namm_wrapped = True


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

    if getattr(GPUModelRunner, "_namm_installed", False):
        return
    GPUModelRunner._namm_installed = True

    orig_init_kv = GPUModelRunner.initialize_kv_cache
    orig_execute = GPUModelRunner.execute_model
    orig_sample = GPUModelRunner.sample_tokens
    orig_build = GPUModelRunner._build_attention_metadata
    orig_group_build = AttentionGroup.build_metadata

    @functools.wraps(orig_init_kv)
    def initialize_kv_cache(self, *args, **kwargs):
        result = orig_init_kv(self, *args, **kwargs)
        from vllm_namm.vllm_patch.engine_config import eviction_config_from

        cfg = eviction_config_from(self.vllm_config)
        if cfg is not None and not kwargs.get("is_profiling", False):
            self._namm = NammRunnerState(self, cfg)
        return result

    @functools.wraps(orig_execute)
    def execute_model(self, scheduler_output, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None:
            return orig_execute(self, scheduler_output, *args, **kwargs)
        namm.before_step(scheduler_output)
        result = orig_execute(self, scheduler_output, *args, **kwargs)
        namm.after_forward(scheduler_output)
        namm.capturing = False
        return channel.attach(result)

    @functools.wraps(orig_sample)
    def sample_tokens(self, *args, **kwargs):
        return channel.attach(orig_sample(self, *args, **kwargs))

    @functools.wraps(orig_build)
    def _build_attention_metadata(self, *args, **kwargs):
        namm: NammRunnerState | None = getattr(self, "_namm", None)
        if namm is None or kwargs.get("for_cudagraph_capture"):
            return orig_build(self, *args, **kwargs)
        global _active_compaction
        rows = namm.compaction_rows()
        _active_compaction = (rows, namm.block_size) if rows else None
        try:
            return orig_build(self, *args, **kwargs)
        finally:
            _active_compaction = None

    @functools.wraps(orig_group_build)
    def build_metadata(self, common_attn_metadata, *args, **kwargs):
        if _active_compaction is not None:
            common_attn_metadata = compact_metadata(common_attn_metadata, *_active_compaction)
        return orig_group_build(self, common_attn_metadata, *args, **kwargs)

    GPUModelRunner.initialize_kv_cache = initialize_kv_cache
    GPUModelRunner.execute_model = execute_model
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    AttentionGroup.build_metadata = build_metadata

