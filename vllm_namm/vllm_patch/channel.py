"""Worker -> scheduler reports of evicted pages, carried on the step's ModelRunnerOutput; and the
scheduler's word to the workers about step snapshots, carried on its SchedulerOutput.

The worker may live in another process than the scheduler (``vllm serve`` on CPU runs a
multiprocess executor even for one worker), so reports ride on the object that already
travels from the worker to the scheduler every step: the worker's :class:`Outbox` attaches them
to its ``ModelRunnerOutput`` (pickled with its ``__dict__``), and the scheduler reads them at the
start of ``update_from_output`` of the same step, before it schedules the next one. A
freed block can therefore never be handed out while this request's worker table still
points at it.

The other way (eviction-aware prefix caching, :mod:`.prefix_records`): a report may announce a step
snapshot the worker took (:class:`SnapshotNote`); the scheduler keeps it or not, and its next
``SchedulerOutput`` tells every worker which requests restore which snapshot and which snapshots
to drop (:func:`send`, :func:`received`), before that step's forward pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

ATTR = "namm_reports"
DIRECTIVES = "namm_snapshots"


@dataclass(frozen=True)
class SnapshotNote:
    """A step snapshot a worker took (:class:`~vllm_namm.step_snapshots.StepSnapshot`) and holds as ``snapshot_id``."""

    snapshot_id: int
    boundary: int
    holes: list[int]
    """Logical pages below the boundary that the snapshot has freed."""
    pending: list[int]
    """Pages its pending step frees (still held at the boundary)."""
    nbytes: int


@dataclass
class EvictionReport:
    """One eviction step of one request (posted even when it freed nothing)."""

    req_id: str
    pages: list[tuple[int, int]]
    """(logical page index, physical block id) pairs the worker turned into holes."""
    requested_tokens: int
    realised_tokens: int
    tokens: int = 0
    """Logical tokens in the request's cache when the step ran (evicted ones included)."""
    group: int = 0
    """The KV-cache group whose pages these are (each evicted group has its own plans)."""
    snapshot: SnapshotNote | None = None
    """The snapshot taken at the boundary this step began at, if any (before its pages are freed)."""


class Outbox:
    """Worker side: reports waiting for this worker's next output (one outbox per model runner)."""

    def __init__(self) -> None:
        self._pending: list[EvictionReport] = []

    def post(
        self,
        req_id: str,
        pages: list[tuple[int, int]],
        requested: int,
        realised: int,
        tokens: int = 0,
        group: int = 0,
        snapshot: SnapshotNote | None = None,
    ) -> None:
        """Queue the report of one eviction step (of one KV-cache group) for this step's output."""
        self._pending.append(EvictionReport(req_id, pages, requested, realised, tokens, group, snapshot))

    def attach(self, output: Any) -> Any:
        """Move pending reports onto ``output`` (copying shared singletons)."""
        if output is None or not self._pending:
            return output
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        if output is EMPTY_MODEL_RUNNER_OUTPUT:
            output = copy.copy(output)
        setattr(output, ATTR, list(self._pending) + list(getattr(output, ATTR, [])))
        self._pending.clear()
        return output


def take(output: Any) -> list[EvictionReport]:
    """Scheduler side: the reports that came with this step's output."""
    return list(getattr(output, ATTR, None) or [])


def send(output: Any, restores: dict[str, int], drops: list[int]) -> None:
    """Scheduler side: tell the workers which requests of this step restore which snapshot, and which
    snapshots to forget (after the restores)."""
    if restores or drops:
        setattr(output, DIRECTIVES, (dict(restores), list(drops)))


def received(output: Any) -> tuple[dict[str, int], list[int]]:
    """Worker side: (request -> snapshot id to restore, snapshot ids to drop) of this scheduler output."""
    return getattr(output, DIRECTIVES, None) or ({}, [])
