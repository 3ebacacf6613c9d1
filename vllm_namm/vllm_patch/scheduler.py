"""Scheduler side of paged eviction: free reported blocks, chunk prompts at NAMM boundaries, and
eviction-aware prefix caching (:mod:`.prefix_records`).

Selected by ``prepare_engine_args`` (``scheduler_cls``) only when eviction is on.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_namm.policies.registry import policy_class
from vllm_namm.vllm_patch import channel
from vllm_namm.vllm_patch.engine_config import SUMMARY_KEY, eviction_config, snapshots_possible
from vllm_namm.vllm_patch.kv_groups import evicted_groups
from vllm_namm.vllm_patch.patching import patch
from vllm_namm.vllm_patch.policy_book import PolicyBook
from vllm_namm.vllm_patch.prefix_records import PrefixRecord, PrefixRecords, fingerprint
from vllm_namm.vllm_patch.request_settings import RequestSettings, parse_request_settings

logger = logging.getLogger("vllm.namm")

_NEVER_CACHE = 1 << 60


@dataclass
class RequestEvictionStats:
    evicted_blocks: int = 0
    requested_tokens: int = 0
    realised_tokens: int = 0
    evicted_pages: list[int] = field(default_factory=list)
    steps: int = 0
    last_step_tokens: int = 0


class NammScheduler(Scheduler):
    """vLLM's scheduler plus: apply the worker's eviction reports before each update.

    * Freed blocks go back to the pool through ``BlockPool.free_blocks`` (a shared or
      prefix-cached block only loses this request's reference) and the request's slot in the
      report's KV-cache group becomes the null block, exactly like vLLM's own sliding-window
      eviction. Eviction runs in the full-attention groups (:mod:`.kv_groups`); vLLM frees
      the sliding-window groups' blocks itself.
    * After a request's first eviction its new blocks are never registered in the prefix
      cache, in any group: they were computed over a pruned context.
    * ``long_prefill_token_threshold`` (= the eviction interval) caps prompt chunks so that
      eviction steps see ``interval`` queries; vLLM lifts that cap when a single request is
      eligible, which for us would skip eviction steps, so we keep it.
    * An evicting request reads no ordinary prefix-cache hit (its policy never saw the cached
      tokens' queries); with eviction-aware prefix caching on, its lookup goes to the step
      snapshots of its own settings instead (:mod:`.prefix_records`), and the step's scheduler
      output tells the workers which snapshot each restoring request resumes from.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._namm_in_schedule = False
        self.namm_stats: dict[str, RequestEvictionStats] = {}
        self._namm_all_managers = self.kv_cache_manager.coordinator.single_type_managers
        self._namm_groups = evicted_groups(self.kv_cache_config)
        """The KV-cache groups eviction frees pages in; the block size is the first one's."""
        self._namm_managers = {g: self._namm_all_managers[g] for g in self._namm_groups}
        self._namm_block_size = self._namm_managers[self._namm_groups[0]].block_size
        server = eviction_config(self.vllm_config)
        if server is None:
            raise RuntimeError("vllm-namm: NammScheduler runs only with an eviction policy")
        self._namm_book = PolicyBook(server)
        self._namm_settings: dict[str, RequestSettings | None] = {}
        """Each running request's ``vllm_xargs`` settings, parsed once when it arrives (None: unparseable)."""
        self._namm_evicting: dict[str, bytes | None] = {}
        """Evicting requests -> their settings' fingerprint (None: they take no snapshot hits)."""
        self._namm_hits: dict[str, PrefixRecord] = {}
        """This schedule's snapshot hits, by request; those allocated restore (``_namm_restoring``)."""
        self._namm_restoring: dict[str, PrefixRecord] = {}
        self._namm_saved: dict[str, int] = {}
        """Tokens each request took from snapshots instead of prefilling them."""
        self._namm_refused: list[int] = []
        """Snapshots the workers took that no record keeps (dropped with the next step)."""
        self._namm_records = self._namm_make_records(server)

    # --- prefix-cache reads ----------------------------------------------------------------------
    def add_request(self, request: Any) -> None:
        self._namm_settings[request.request_id] = settings = self._namm_parse(request)
        if self._namm_evicts(settings):
            # A cache hit skips the prefill of the cached tokens, so their queries never reach the
            # policy: attention columns, NAMM's EMA, H2O's sums and SnapKV's window would see
            # another request, and the pages kept (so the answer) would depend on what happened
            # to be cached. An evicting request therefore reads no ordinary prefix-cache hit (it
            # still writes its full-context blocks for requests that do not evict); it may resume
            # from a step snapshot of its own settings instead (_namm_computed_blocks).
            fp = self._namm_fingerprint(settings)
            self._namm_evicting[request.request_id] = fp
            if fp is None:
                request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _namm_make_records(self, server: Any) -> PrefixRecords | None:
        """The snapshot records, when eviction-aware prefix caching can work here (else None): with one
        KV-cache group only (``snapshots_possible``), whose manager is then the only one."""
        if not server.prefix_cache_mib or not snapshots_possible(self.vllm_config, self.kv_cache_config):
            return None
        manager, kv = self._namm_all_managers[0], self.kv_cache_manager
        pool = manager.block_pool
        if (
            not kv.enable_caching
            or self.connector is not None
            or kv.enable_kv_cache_events
            or pool.hash_block_size != self._namm_block_size
        ):
            return None
        patch(kv, "get_computed_blocks")(self._namm_computed_blocks)
        patch(manager, "add_local_computed_blocks")(self._namm_add_computed_blocks)
        return PrefixRecords(pool, 0, self._namm_block_size, int(server.prefix_cache_mib * 2**20))

    def _namm_fingerprint(self, settings: RequestSettings | None) -> bytes | None:
        if self._namm_records is None or settings is None:
            return None
        try:
            config = self._namm_book.config(settings)
        except ValueError:
            return None
        return fingerprint(config, settings.state_options(), self._namm_block_size)

    def _namm_computed_blocks(self, original: Any, request: Any) -> Any:
        """vLLM's prefix-cache lookup; for an evicting request, the longest step snapshot of its settings."""
        rid = request.request_id
        if rid not in self._namm_evicting:
            return original(request)
        kv, fp = self.kv_cache_manager, self._namm_evicting[rid]
        hit = None
        if fp is not None and self._namm_records is not None and kv.prefix_cache_lookup_enabled(request):
            hit = self._namm_records.lookup(fp, request)
        if hit is None:
            return kv.empty_kv_cache_blocks, 0, 0
        record, blocks = hit
        self._namm_hits[rid] = record
        return kv.create_kv_cache_blocks((blocks,)), record.boundary, 0

    def _namm_add_computed_blocks(self, original: Any, request_id: str, *args: Any, **kwargs: Any) -> None:
        """The hit is allocated: the request restores it. Past a hole, its new blocks see a pruned
        context and are never registered as ordinary prefix-cache blocks."""
        original(request_id, *args, **kwargs)
        record = self._namm_hits.get(request_id)
        if record is not None:
            self._namm_restoring[request_id] = record
            if None in record.pages:
                self._namm_all_managers[0].num_cached_block[request_id] = _NEVER_CACHE

    @staticmethod
    def _namm_parse(request: Any) -> RequestSettings | None:
        """The request's eviction settings; None when they do not parse (validated at the API server
        already, so only an in-process caller can get here: treat it as evicting)."""
        params = getattr(request, "sampling_params", None)
        try:
            return parse_request_settings(getattr(params, "extra_args", None))
        except ValueError:
            return None

    def _namm_evicts(self, settings: RequestSettings | None) -> bool:
        """Whether a request with these settings runs an eviction policy (the server's, or its own)."""
        if settings is None:
            return True
        try:
            return policy_class(self._namm_book.config(settings).policy).evicts
        except ValueError:
            return True

    # --- NAMM-boundary chunking -------------------------------------------------------------
    def get_request_counts(self) -> tuple[int, int]:
        running, waiting = super().get_request_counts()
        if self._namm_in_schedule:
            running = max(running, 2)  # keep the long-prefill cap even for a lone request
        return running, waiting

    def schedule(self, *args: Any, **kwargs: Any):
        self._namm_in_schedule = True
        self._namm_hits.clear()
        self._namm_restoring.clear()
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self._namm_in_schedule = False
        restores = {}
        for rid, record in self._namm_restoring.items():
            restores[rid] = record.snapshot_id
            self.namm_stats[rid] = copy.deepcopy(record.stats)
            self._namm_saved[rid] = self._namm_saved.get(rid, 0) + record.boundary
        drops, self._namm_refused = self._namm_refused, []
        if self._namm_records is not None:
            drops += self._namm_records.take_drops()
        channel.send(output, restores, drops)
        return output

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """vLLM's reset; the step snapshots go with the pages they refer to."""
        done = super().reset_prefix_cache(*args, **kwargs)
        if done and self._namm_records is not None:
            self._namm_records.clear()
        return done

    # --- freeing -------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: Any, model_runner_output: Any):
        self.apply_evictions(channel.take(model_runner_output))
        return super().update_from_output(scheduler_output, model_runner_output)

    def apply_evictions(self, reports: list[channel.EvictionReport]) -> None:
        for report in reports:
            manager = self._namm_managers[report.group]
            request = self.requests.get(report.req_id)
            blocks = manager.req_to_blocks.get(report.req_id)
            note = report.snapshot
            if request is None or request.is_finished() or blocks is None:
                if note is not None:
                    self._namm_refused.append(note.snapshot_id)
                continue  # already freed as a whole
            stats = self.namm_stats.setdefault(report.req_id, RequestEvictionStats())
            if note is not None and note.pending:  # its pages are still held: hashed before they go
                self._namm_record(request, blocks, note, stats)
            freed = []
            for page, block_id in report.pages:
                block = blocks[page]
                if block.is_null:
                    logger.error("vllm-namm: page %d of %s was already free; ignored", page, report.req_id)
                    continue
                if block.block_id != block_id:
                    raise RuntimeError(
                        f"vllm-namm: worker evicted block {block_id} at page {page} of {report.req_id} "
                        f"(KV-cache group {report.group}), but the scheduler holds block {block.block_id} there"
                    )
                blocks[page] = manager._null_block
                freed.append(block)
                stats.evicted_pages.append(page)
            if freed:
                manager.block_pool.free_blocks(freed)
                for every in self._namm_all_managers:  # later blocks of every group saw a pruned context
                    every.num_cached_block[report.req_id] = _NEVER_CACHE
            stats.evicted_blocks += len(freed)
            stats.requested_tokens += report.requested_tokens
            stats.realised_tokens += report.realised_tokens
            if report.group == self._namm_groups[0]:  # one eviction step covers every evicted group
                stats.steps += 1
            stats.last_step_tokens = report.tokens
            if note is not None and not note.pending:  # the step's pages are holes of the snapshot
                self._namm_record(request, blocks, note, stats)

    def _namm_record(self, request: Any, blocks: list[Any], note: Any, stats: RequestEvictionStats) -> None:
        fp = self._namm_evicting.get(request.request_id)
        if self._namm_records is None or fp is None:
            self._namm_refused.append(note.snapshot_id)
        else:
            self._namm_records.add(fp, request, blocks, note, stats)

    def held_blocks(self, req_id: str) -> int:
        """Blocks the request holds in the evicted groups."""
        return sum(self.held_blocks_by_group(req_id))

    def held_blocks_by_group(self, req_id: str) -> list[int]:
        """Blocks the request holds in each evicted group, in group order."""
        return [
            sum(1 for b in manager.req_to_blocks.get(req_id) or [] if not b.is_null)
            for manager in self._namm_managers.values()
        ]

    def _namm_budget(self, request: Any) -> dict[str, int]:
        """``budget_tokens`` / ``budget_blocks`` of a policy ranking under a budget, at the request's final
        context (the budget its last eviction step met is at most this); {} for other policies."""
        settings = self._namm_settings.get(request.request_id)
        try:
            budget = None if settings is None else self._namm_book.policy(settings).budget
        except (ValueError, OSError):
            return {}
        if budget is None:
            return {}
        tokens = budget.size(request.num_computed_tokens, request.num_computed_tokens)
        return {"budget_tokens": tokens, "budget_blocks": -(-tokens // self._namm_block_size)}

    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        stats = self.namm_stats.pop(request.request_id, None)
        summary = None
        if stats is not None:
            pages = -(-request.num_computed_tokens // self._namm_block_size)
            logical = pages * len(self._namm_groups)  # every evicted group spans the whole context
            held = self.held_blocks(request.request_id)
            summary = {
                "retained_fraction": held / logical if logical else 1.0,
                "evicted_blocks": stats.evicted_blocks,
                "logical_blocks": logical,
                "held_blocks": held,
                "token_evictions_requested": stats.requested_tokens,
                "token_evictions_realised": stats.realised_tokens,
                "evicted_pages": sorted(stats.evicted_pages),
                "eviction_steps": stats.steps,
                "last_eviction_at": stats.last_step_tokens,
                "blocks_held_by_evicting_requests": sum(self.held_blocks(r) for r in self.namm_stats),
                "prefix_restored_tokens": self._namm_saved.get(request.request_id, 0),
            }
            if len(self._namm_groups) > 1:  # per-layer pages (or several full-attention groups)
                summary["held_blocks_by_group"] = self.held_blocks_by_group(request.request_id)
            records = self._namm_records
            if records is not None:
                summary |= {"prefix_records": len(records), "prefix_record_bytes": records.nbytes}
            summary |= self._namm_budget(request)
            logger.info(
                "vllm-namm: request %s finished holding %d of %d KV blocks (retained %.1f%%, %d evicted)",
                request.request_id,
                held,
                logical,
                100 * summary["retained_fraction"],
                stats.evicted_blocks,
            )
        self._namm_settings.pop(request.request_id, None)
        self._namm_evicting.pop(request.request_id, None)
        self._namm_saved.pop(request.request_id, None)
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        if summary is not None and kv_params is None:
            kv_params = {SUMMARY_KEY: summary}
        return kv_params, ec_params
