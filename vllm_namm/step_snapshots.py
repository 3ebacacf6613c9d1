"""A request's eviction state at a step boundary, so that a later request with the same prefix and
settings resumes from there (eviction-aware prefix caching, issue 27): the worker's half, free of
vLLM imports. The scheduler's half (which pages, under which key, within which memory bound) is
:mod:`vllm_namm.vllm_patch.prefix_records`.

An eviction step's outcome is a function of the token prefix and the settings *given the
schedule*: which chunks of the request ran before which holes appeared. A request therefore
records only while its history is the one a request with this prompt has on its own
(:attr:`~vllm_namm.request_memory.RequestMemory.canonical`: every engine step since it started
computed one interval-aligned chunk of it), and only where a step begins at a boundary B with
every query so far taken by that step and nothing beyond B cached
(:attr:`~vllm_namm.request_memory.EvictionStep.resumable`). Besides the KV pages below B, the
request's future then depends on exactly what a :class:`StepSnapshot` holds:

* the holes (pages freed before B) and the number of steps so far;
* each layer's policy state once the step at B was computed (NAMM's EMA and STFT carry, H2O's
  sums): copies, since the recording request goes on with its own;
* that step's page plan, **pending** when ``lag >= 2``: its pages are freed ``lag - 1`` engine
  steps after B, so the chunks right after B were computed with them still in the cache. A
  restored request replays that: the plan is applied after the same number of its own engine
  steps (:meth:`StepSnapshot.restore` returns the step to submit). With ``lag <= 1`` the holes
  appear within the engine step that began the step, so they are holes of the snapshot.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_namm.cache_reader import KeysReader
from vllm_namm.page_votes import PagePlan
from vllm_namm.policies import PolicyState
from vllm_namm.request_memory import EvictionStep, RequestMemory


@dataclass(frozen=True)
class PendingPlan:
    """The page plan of the step begun at the boundary, not applied there yet (``lag >= 2``)."""

    free_pages: list[int]
    requested: list[int]
    realised: list[int]
    num_tokens: int


@dataclass(frozen=True)
class StepSnapshot:
    """Everything but the KV pages a request needs to resume eviction at ``boundary``."""

    boundary: int
    holes: frozenset[int]
    steps: int
    states: list[PolicyState]
    pending: PendingPlan | None

    @classmethod
    def take(cls, step: EvictionStep, pending: bool) -> StepSnapshot:
        """The state a resumable ``step`` leaves once computed, before its holes are made (engine thread).
        ``pending``: its holes appear after later chunks (``lag >= 2``), else they count as holes here."""
        mem, plan = step.mem, step.plan
        if plan is None or not step.resumable or step.restored:
            raise ValueError(f"no snapshot of the step of {step.req_id!r}: not a computed resumable step")
        holes, steps, later = frozenset(mem.evicted_pages), mem.steps, None
        if pending:
            later = PendingPlan(
                list(plan.free_pages), list(plan.requested), list(plan.realised), step.num_tokens
            )
        else:
            holes, steps = holes | frozenset(plan.free_pages), steps + 1
        return cls(step.num_tokens, holes, steps, [_copy_state(s) for s in mem.states], later)

    @property
    def nbytes(self) -> int:
        """Bytes of the policy states (what bounds a worker's snapshots)."""
        return sum(
            v.numel() * v.element_size()
            for s in self.states
            for v in vars(s).values()
            if isinstance(v, Tensor)
        )

    def restore(self, mem: RequestMemory, req_id: str) -> EvictionStep | None:
        """Put ``mem`` (a fresh request memory whose prompt shares the prefix below ``boundary``) where
        the recording request was at the boundary; returns the pending step, to be applied ``lag - 1``
        engine steps after the restored request's first one (None: nothing pending)."""
        if mem.step is not None or mem.num_unscored:
            raise RuntimeError(f"request {req_id!r} restores a snapshot with eviction already under way")
        mem.num_tokens = mem.scored_tokens = self.boundary
        mem.evicted_pages = set(self.holes)
        mem.steps = self.steps
        mem.states = [_copy_state(s) for s in self.states]
        mem.canonical = True
        if self.pending is None:
            return None
        p = self.pending
        mem.step = step = EvictionStep(
            mem=mem,
            reader=KeysReader(_no_keys),
            req_id=req_id,
            queries=[],
            query_positions=torch.empty(0, dtype=torch.long),
            positions=torch.empty(0, dtype=torch.long),
            num_new_tokens=0,
            protect_from_position=self.boundary,
            num_tokens=p.num_tokens,
            plan=PagePlan(
                list(p.free_pages), torch.empty(0, dtype=torch.bool), list(p.requested), list(p.realised)
            ),
            restored=True,
        )
        return step


def _no_keys(layer: int) -> Tensor:
    raise RuntimeError("a restored eviction step was computed by the request that recorded it")


def _copy_state(state: PolicyState) -> PolicyState:
    """A copy whose tensors the copied state's owner can never change (states reassign, but the fused
    GPU kernel's outputs are not promised to be fresh tensors)."""
    out = copy.copy(state)
    for name, value in vars(out).items():
        if isinstance(value, Tensor):
            setattr(out, name, value.clone())
    return out


class SnapshotStore:
    """The snapshots one worker holds, by id. The scheduler decides which to keep (it bounds their
    memory, and knows which pages are still cached) and tells every worker which to drop; ids are
    handed out in the order the snapshots are taken, which every worker of a tensor-parallel group
    shares (the same steps, applied in the same order), so they name the same snapshot everywhere."""

    def __init__(self) -> None:
        self._next = 0
        self._held: dict[int, StepSnapshot] = {}

    def __len__(self) -> int:
        return len(self._held)

    def add(self, snapshot: StepSnapshot) -> int:
        self._next += 1
        self._held[self._next] = snapshot
        return self._next

    def get(self, snapshot_id: int) -> StepSnapshot:
        try:
            return self._held[snapshot_id]
        except KeyError:
            raise RuntimeError(
                f"vllm-namm: the scheduler restores snapshot {snapshot_id}, which this worker dropped"
            ) from None

    def drop(self, snapshot_ids: list[int]) -> None:
        for i in snapshot_ids:
            self._held.pop(i, None)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._held.values())
