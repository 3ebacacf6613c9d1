"""Eviction steps off the critical path: one worker thread, decisions applied at a fixed lag.

Why a thread: the expensive part of a step (attention columns, spectrograms, scoring) is
torch work that releases the GIL, so it can run while the engine thread runs the next forward
passes. On CPU, vLLM binds the worker's OpenMP threads to its own cores and keeps others for
the scheduler and API processes; the eviction thread is pinned to a core the worker's main
thread does not use (``VLLM_NAMM_EVICTION_CPUS`` overrides the choice). On GPU it computes on
a side CUDA stream.

Why a *fixed* lag: a decision submitted at engine step ``s`` is applied at step ``s + lag``
exactly, waiting for it if it is late and holding it if it is early. Applying "whenever it is
ready" would make the moment pages disappear, and so the generated tokens, depend on thread
timing; a fixed lag keeps outputs deterministic (``lag = 0`` is the synchronous path). The
tokens computed during the lag are never at risk: a step only frees pages older than its own
queries, and a request has at most one step in flight (:meth:`RequestMemory.due`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

logger = logging.getLogger("vllm.namm")

J = TypeVar("J")
R = TypeVar("R")
CPUS_ENV = "VLLM_NAMM_EVICTION_CPUS"


def eviction_cpus(engine_cpus: set[int]) -> set[int] | None:
    """CPUs for the eviction thread: ``VLLM_NAMM_EVICTION_CPUS`` ("2,3" or "2-3"), else every CPU
    the engine thread is not bound to, else None (leave the inherited mask)."""
    raw = os.environ.get(CPUS_ENV, "").strip()
    if raw:
        cpus: set[int] = set()
        for part in raw.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        return cpus
    others = set(range(os.cpu_count() or 1)) - engine_cpus
    return others or None


@dataclass
class _Batch(Generic[J, R]):
    apply_at: int
    future: Future[list[R]]


class LaggedExecutor(Generic[J, R]):
    """Runs ``compute(jobs)`` on one background thread; results come back ``lag`` steps later.

    ``step()`` advances the engine-step counter; ``submit`` queues a batch of jobs; ``due()``
    returns the results of every batch whose step has come (blocking on a late one) in
    submission order. ``lag = 0`` computes inline, on the caller's thread.
    """

    def __init__(
        self,
        compute: Callable[[list[J]], list[R]],
        lag: int,
        device: torch.device | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.compute = compute
        self.lag = lag
        self.now = 0
        self._batches: list[_Batch[J, R]] = []
        self._stream = None
        self._executor: ThreadPoolExecutor | None = None
        if lag > 0:
            if device is not None and device.type == "cuda":
                self._stream = torch.cuda.Stream(device=device)
            self._executor = ThreadPoolExecutor(
                1, thread_name_prefix="namm-evict", initializer=self._init_thread, initargs=(cpus, device)
            )

    @staticmethod
    def _init_thread(cpus: set[int] | None, device: torch.device | None) -> None:
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)  # 0 = this thread
            except (OSError, ValueError) as e:
                logger.warning("vllm-namm: could not pin the eviction thread to CPUs %s: %s", sorted(cpus), e)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)

    def _run(self, jobs: list[J], ready: torch.cuda.Event | None) -> list[R]:
        if self._stream is None:
            return self.compute(jobs)
        with torch.cuda.stream(self._stream):
            if ready is not None:
                self._stream.wait_event(ready)  # the captured queries were written on the main stream
            out = self.compute(jobs)
        self._stream.synchronize()
        return out

    def submit(self, jobs: Sequence[J]) -> None:
        jobs = list(jobs)
        if not jobs:
            return
        future: Future[list[R]] = Future()
        if self._executor is None:
            try:
                future.set_result(self.compute(jobs))
            except Exception as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
        else:
            ready = None
            if self._stream is not None:
                ready = torch.cuda.Event()
                ready.record()
            future = self._executor.submit(self._run, jobs, ready)
        self._batches.append(_Batch(self.now + self.lag, future))

    def submit_done(self, results: Sequence[R], submitted_at: int) -> None:
        """Queue results computed elsewhere as if submitted at engine step ``submitted_at`` (at most
        now): a restored request's pending step, applied at the lag it had in the request that
        computed it."""
        if submitted_at > self.now:
            raise ValueError(f"results submitted at step {submitted_at}, after now ({self.now})")
        future: Future[list[R]] = Future()
        future.set_result(list(results))
        apply_at = submitted_at + self.lag
        at = len(self._batches)
        while at and self._batches[at - 1].apply_at > apply_at:  # keep the queue in application order
            at -= 1
        self._batches.insert(at, _Batch(apply_at, future))

    def step(self) -> None:
        """One engine step has passed."""
        self.now += 1

    def due(self) -> list[Future[list[R]]]:
        """Futures (all done) of the batches to apply now, oldest first."""
        out = []
        while self._batches and self._batches[0].apply_at <= self.now:
            batch = self._batches.pop(0)
            batch.future.exception()  # waits for a late batch; exceptions are the caller's
            out.append(batch.future)
        return out

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
