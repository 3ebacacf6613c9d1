"""The computed part of eviction steps: every step due at one engine step, scored together.

Per layer, the attention columns of each step are computed, handed to its policy's ``prepare`` and
dropped; then each policy scores all its (request, layer) entries in one ``score_prepared`` call, and
each request's page plan is decided (:mod:`vllm_namm.page_plan`). This runs off the critical path
(any thread) and touches only the steps' own policy states: see
:class:`~vllm_namm.request_memory.EvictionStep` for the life cycle around it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vllm_namm.config import EvictionConfig
from vllm_namm.features import attention_columns
from vllm_namm.page_plan import PagesByBudget, PagesByRule, budget_votes, rule_votes
from vllm_namm.page_votes import PageVotes, Reduce, reduce_votes
from vllm_namm.policies import EvictionPolicy, LayerView, PolicyState, protect, protected_mask

if TYPE_CHECKING:
    from vllm_namm.request_memory import EvictionStep


class PeerStepError(RuntimeError):
    """Another worker of the tensor-parallel group failed this batch: nobody applies it."""


@torch.no_grad()
def compute_steps(
    steps: list[EvictionStep],
    config: EvictionConfig,
    scale: float,
    kv_heads: int,
    device: torch.device | str = "cpu",
    reduce: Reduce | None = None,
    layers: tuple[int, int] | None = None,
) -> list[EvictionStep]:
    """Score every scored token of every layer of every step; set each step's :attr:`plan` and filter
    its policy states with it. Returns ``steps``.

    ``reduce`` (tensor parallel, see :data:`vllm_namm.page_votes.Reduce`): this worker holds
    ``kv_heads`` of every layer's KV heads; the workers agree on every page plan through
    at most three collectives per batch, whatever the number of steps: whether every worker computed
    its part (a worker whose part failed still takes part, so nobody waits forever, and then
    every worker drops the batch), the summed tallies and the maximal ones
    (:func:`~vllm_namm.page_votes.reduce_votes`). Every worker must call it with the same steps
    (requests and positions) in the same order. ``layers`` = (first, total) (pipeline
    parallel): the steps' layers are layers ``first, first + 1, ...`` of ``total``; the plans'
    per-layer statistics then cover all ``total`` layers.
    """
    error: BaseException | None = None
    votes: list[PageVotes] = []
    try:
        votes = _local_votes(steps, config, scale, kv_heads, device)
        if layers is not None:
            for vote in votes:
                vote.place_layers(*layers)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the peers have heard of it
        if reduce is None:
            raise
        error = e
    if reduce is not None:
        failed = reduce(torch.tensor([0.0 if error is None else 1.0], dtype=torch.float64), "max")
        if error is not None:
            raise error
        if float(failed[0]) > 0:
            raise PeerStepError("an eviction step failed on another tensor-parallel worker")
        reduce_votes(votes, reduce)
    for step, vote in zip(steps, votes, strict=True):
        step.plan = plan = vote.decide()
        for state in step.mem.states:
            state.filter(plan.token_keep.to(state_device(state, plan.token_keep)))
    return steps


def _layer_view(
    step: EvictionStep,
    layer: int,
    policy: EvictionPolicy,
    scale: float,
    kv_heads: int,
    device: torch.device | str,
) -> LayerView:
    """One layer's view: columns from the reader (or from its keys), only the rows or the sums the
    policy reads (:attr:`~vllm_namm.policies.EvictionPolicy.attention_window`,
    :attr:`~vllm_namm.policies.EvictionPolicy.attention_sums`), or the fused feature source."""
    reader, positions, qpos = step.reader, step.positions, step.query_positions
    n = positions.numel()
    keys = reader.keys(layer)[:n] if policy.needs_keys else None
    attn, sums, paged = None, None, None
    if policy.needs_attention:
        queries = step.queries[layer]
        rows = policy.attention_window
        if rows is not None and rows < queries.shape[0]:  # each row's softmax is its own: exact
            queries, qrows = queries[-rows:], qpos[-rows:]
        else:
            qrows = qpos
        if policy.accepts_paged_features:
            paged = reader.paged_features(layer, queries, qrows, positions)
        if paged is None and policy.attention_sums:
            sums = reader.column_sums(layer, queries, qrows, positions)
            if sums is not None and not bool(torch.isfinite(sums).all()):
                sums = None  # a broken row: the policy reads the matrix (it drops non-finite entries)
        if paged is None and sums is None:
            attn = reader.columns(layer, queries, qrows, positions)
            if attn is None:
                k = keys if keys is not None else reader.keys(layer)[:n]
                attn = attention_columns(
                    queries.to(k.device), k, qrows.to(k.device), positions.to(k.device), scale
                )
            attn = attn[..., :n]
    return LayerView(
        attn=attn,
        keys=keys.permute(1, 0, 2) if keys is not None else None,
        positions=positions.to(device).unsqueeze(0).expand(kv_heads, -1),
        query_positions=qpos.to(device),
        num_new_tokens=step.num_new_tokens,
        attn_sums=sums,
        paged_features=paged,
    )


def _local_votes(
    steps: list[EvictionStep], config: EvictionConfig, scale: float, kv_heads: int, device: torch.device | str
) -> list[PageVotes]:
    """This worker's per-page tallies of every step (its own KV heads only)."""
    by_policy: dict[int, tuple[EvictionPolicy, list[Any], list[tuple[int, int]]]] = {}
    views: dict[tuple[int, int], LayerView] = {}
    for j, step in enumerate(steps):
        policy = step.mem.policy
        _, prepared, slots = by_policy.setdefault(id(policy), (policy, [], []))
        for layer in range(step.mem.num_layers):
            view = _layer_view(step, layer, policy, scale, kv_heads, device)
            prepared.append(policy.prepare(view, step.mem.states[layer]))
            view.attn, view.attn_sums, view.paged_features = None, None, None  # consumed: free them now
            views[j, layer] = view
            slots.append((j, layer))
    keep: dict[tuple[int, int], Tensor] = {}
    scores_of: dict[tuple[int, int], Tensor] = {}
    for policy, prepared, slots in by_policy.values():
        for slot, scores in zip(slots, policy.score_prepared(prepared), strict=True):
            view = views[slot]
            scores_of[slot] = scores
            keep[slot] = protect(policy.select(scores, view), view, config.protect)
    votes = []
    for j, step in enumerate(steps):
        mem = step.mem
        layers = range(mem.num_layers)
        masks = [keep[j, layer] for layer in layers]
        budget = mem.policy.budget  # budget policies, and namm ranked under a budget
        if config.selection == "page" and budget is not None:  # whole pages within the budget
            pages = PagesByBudget(
                [scores_of[j, layer] for layer in layers],
                step.positions,
                mem.block_size,
                keep_tokens=budget.size(step.positions.numel(), step.num_tokens, mem.budget_scale),
                aggregate=mem.policy.page_score or config.page_score,
                protected_token_mask=protected_mask(views[j, 0], config.protect).any(dim=0),
                protect_from_position=step.protect_from_position,
                keep_masks=masks,
            )
            votes.append(budget_votes(pages))
        else:
            rule = PagesByRule(
                masks,
                step.positions,
                mem.block_size,
                rule=config.page_rule,
                protect_from_position=step.protect_from_position,
            )
            votes.append(rule_votes(rule))
    return votes


def state_device(state: PolicyState, fallback: Tensor) -> torch.device:
    """Device of a policy state's tensors (states created lazily have none yet)."""
    for value in vars(state).values():
        if isinstance(value, Tensor):
            return value.device
    return fallback.device
