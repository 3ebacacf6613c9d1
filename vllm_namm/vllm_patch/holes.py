"""Freed pages become holes in this worker's block table, and attention never sees them.

* :class:`Holes`: a computed plan's pages are nulled (block id 0, vLLM's null block) in the
  worker's table of the plan's KV-cache group and in the runner's own copy of the request's block
  ids, right away or, under pipeline parallelism, ``pp - 1`` engine steps after the report
  (:meth:`Holes.make_due`).
* :func:`compact_metadata`: before attention metadata is built, the block-table rows that have holes
  are compacted and their ``seq_lens`` shortened, so that stock attention backends simply never see
  the evicted pages. Each KV-cache group has its own holes, so each group's metadata gets its own
  compaction (:func:`compacting`). Slot mappings keep using the logical table (new tokens are never
  written into a hole) and RoPE positions stay logical.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from vllm_namm.request_memory import EvictionStep

logger = logging.getLogger("vllm.namm")

NULL_BLOCK_ID = 0
ATTR = "_namm_compaction"
"""Attribute of an ``AttentionGroup`` holding the :class:`Compaction` while the runner builds metadata."""

Freed = list[tuple[int, int]]
"""(logical page, physical block id) pairs."""


@dataclass(frozen=True)
class Compaction:
    """The holed rows of one step's batch: batch row -> number of holes (evicted pages)."""

    rows: dict[int, int]
    block_size: int

    def apply(self, cm: Any) -> Any:
        return compact_metadata(cm, self.rows, self.block_size)


def compaction_of(attention_group: Any) -> Compaction | None:
    """The compaction the runner asked for while it builds this group's metadata (else None)."""
    return getattr(attention_group, ATTR, None)


@contextmanager
def compacting(attention_groups: list[list[Any]], compactions: dict[int, Compaction]) -> Iterator[None]:
    """Hand each KV-cache group's compaction (``compactions``: group index -> its rows with holes) to
    that group's attention groups while their metadata is built."""
    for kv_group, per_kv_group in enumerate(attention_groups):
        for g in per_kv_group:
            setattr(g, ATTR, compactions.get(kv_group))
    try:
        yield
    finally:
        for per_kv_group in attention_groups:
            for g in per_kv_group:
                setattr(g, ATTR, None)


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


class Holes:
    """Turns computed plans into holes in one model runner's block table.

    ``delay``: engine steps between a plan's report and its holes (``pp - 1`` with pipeline stages).
    Why a delay: with ``pp`` stages vLLM keeps ``pp`` batches in flight, so the scheduler has already
    scheduled the next ``pp - 1`` steps when it reads a report. A forward pass of those steps must not
    see the holes yet: the blocks it completes were registered in the prefix cache when they were
    scheduled, before the scheduler learnt that this request evicts (after which it registers none),
    so they must hold the unpruned context's KV. The freed blocks themselves cannot be reused before
    step ``s + pp`` either (they return to the pool with the report), and until then they still hold
    this request's keys.
    """

    def __init__(self, runner: Any, delay: int) -> None:
        self.runner = runner
        self.delay = delay
        self._deferred: list[tuple[int, EvictionStep, int, Freed]] = []

    def freed_blocks(self, step: EvictionStep, group: int) -> Freed:
        """The (page, block id) pairs the step's plan frees in KV-cache group ``group``, from the runner's
        own copy of the request's block ids: the request may be out of this step's batch (not
        scheduled, e.g. every other step under pipeline parallelism); its table row is rebuilt from
        these ids when it comes back."""
        assert step.plan is not None
        block_ids = self.runner.requests[step.req_id].block_ids[group]
        freed = []
        for page in step.plan.free_pages:
            block_id = int(block_ids[page])
            if block_id == NULL_BLOCK_ID:
                raise RuntimeError(f"vllm-namm: page {page} of {step.req_id} evicted twice")
            freed.append((page, block_id))
        return freed

    def make(self, step: EvictionStep, group: int, freed: Freed, now: int) -> None:
        """The holes of a computed step in KV-cache group ``group``: now, or at engine step ``now + delay``."""
        if self.delay:
            self._deferred.append((now + self.delay, step, group, freed))
        else:
            self._make(step, group, freed)

    def make_due(self, now: int, current: Callable[[EvictionStep], bool]) -> None:
        """The deferred holes whose delay has passed, of the steps whose request still waits for them."""
        while self._deferred and self._deferred[0][0] <= now:
            _, step, group, freed = self._deferred.pop(0)
            if current(step):
                self._make(step, group, freed)

    def _make(self, step: EvictionStep, group: int, freed: Freed) -> None:
        """Null the freed pages in this worker's block table of ``group`` and finish the step."""
        req_id = step.req_id
        batch = self.runner.input_batch
        table = batch.block_table[group].block_table.np
        row = batch.req_id_to_index.get(req_id)  # None: not scheduled this step (rebuilt from block_ids)
        block_ids = self.runner.requests[req_id].block_ids[group]
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
