"""Worker -> scheduler reports of evicted pages, carried on the step's ModelRunnerOutput.

The worker may live in another process than the scheduler (``vllm serve`` on CPU runs a
multiprocess executor even for one worker), so reports ride on the object that already
travels from the worker to the scheduler every step: the worker's :class:`Outbox` attaches them
to its ``ModelRunnerOutput`` (pickled with its ``__dict__``), and the scheduler reads them at the
start of ``update_from_output`` of the same step, before it schedules the next one. A
freed block can therefore never be handed out while this request's worker table still
points at it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

ATTR = "namm_reports"


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
    ) -> None:
        """Queue the report of one eviction step (of one KV-cache group) for this step's output."""
        self._pending.append(EvictionReport(req_id, pages, requested, realised, tokens, group))

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
