"""Worker -> scheduler reports of evicted pages.

The scheduler and the worker share the EngineCore process (vLLM's uni-process executor,
which the plugin requires when eviction is on), so a module-level queue is enough. The
worker posts after its forward pass; the scheduler drains the queue at the start of
``update_from_output`` of the same step, before it schedules the next one, so a freed
block can never be handed out while this request's worker table still points at it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class EvictionReport:
    req_id: str
    pages: list[tuple[int, int]]
    """(logical page index, physical block id) pairs the worker turned into holes."""
    requested_tokens: int
    realised_tokens: int


_lock = threading.Lock()
_queue: list[EvictionReport] = []


def post(req_id: str, pages: list[tuple[int, int]], requested: int, realised: int) -> None:
    with _lock:
        _queue.append(EvictionReport(req_id, pages, requested, realised))


def drain() -> list[EvictionReport]:
    with _lock:
        out = list(_queue)
        _queue.clear()
    return out
