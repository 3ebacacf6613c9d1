"""The workers of one engine agreeing on page plans: a gloo group of our own.

Several workers (tensor x pipeline parallel ranks) share one block table, so every page plan must
be the same on all of them: each scores what it holds and the tallies are combined here (see
:func:`vllm_namm.eviction_batch.compute_steps`). Only the rank whose output vLLM returns to the
scheduler reports the freed pages (:func:`is_reporting_rank`).
"""

from __future__ import annotations

from typing import Any

import torch


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
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

        if not model_parallel_is_initialized():
            return None
        tp, pp = get_tp_group(), get_pp_group()
        if tp.world_size * pp.world_size == 1:
            return None
        # vLLM lays ranks out as [..., PP, TP]: stage s's TP ranks are s's PP-group rank's TP neighbours
        ranks = sorted(p - tp.rank_in_group + j for p in pp.ranks for j in range(tp.world_size))
        group = dist.new_group(
            ranks, backend="gloo", use_local_synchronization=True, group_desc="vllm_namm_page_votes"
        )
        return cls(group, ranks.index(dist.get_rank()), len(ranks), pp.world_size)

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """All-reduce ``t`` over the ranks (``op``: sum or max); gloo works on CPU tensors."""
        import torch.distributed as dist

        out = t.detach().to("cpu", copy=True).contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
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
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized():
        return True
    return get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank
