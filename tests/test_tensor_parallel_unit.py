"""Tensor-parallel page decisions without an engine: workers that each hold some KV heads agree.

Each simulated worker runs in its own thread and owns a contiguous slice of the KV heads (as a
vLLM TP rank does); :class:`FakeGroup` combines their tensors like an all-reduce. A split run
must free exactly the pages the unsplit run frees, with the same statistics, and the check must
not be empty (the workers' own, unreduced plans differ).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

from vllm_namm.config import EvictionConfig
from vllm_namm.paged_memory import PagedCacheReader, PeerStepError, RequestMemory, begin_step, compute_steps
from vllm_namm.paging import PagePlan, plan_pages, select_pages
from vllm_namm.policies import make_policy


class FakeGroup:
    """``n`` in-process workers whose ``reduce(t, op)`` behaves like an all-reduce over them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * n
        self.calls: list[list[str]] = [[] for _ in range(n)]

    def reduce_for(self, rank: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.calls[rank].append(op)
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            parts = list(self.slots)
            assert all(p is not None and p.shape == t.shape and p.dtype == t.dtype for p in parts), \
                "workers disagree on a collective's shape: their batches differ"
            out = parts[0].clone()
            for p in parts[1:]:
                out = out + p if op == "sum" else torch.maximum(out, p)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read them
            return out

        return reduce

    def run(self, fn: Callable[[int, Callable[[torch.Tensor, str], torch.Tensor]], Any]) -> list[Any]:
        with ThreadPoolExecutor(self.n) as ex:
            return [f.result() for f in [ex.submit(fn, r, self.reduce_for(r)) for r in range(self.n)]]


def same_plan(a: PagePlan, b: PagePlan) -> None:
    assert a.free_pages == b.free_pages
    assert torch.equal(a.token_keep, b.token_keep)
    assert (a.requested, a.realised, a.forced) == (b.requested, b.realised, b.forced)


def heads(t: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Worker ``rank``'s contiguous slice of dim 0 (KV heads), as vLLM shards them."""
    per = t.shape[0] // n
    return t[rank * per : (rank + 1) * per]


def positions_with_holes(n_pages: int = 24, block: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    live = torch.sort(torch.randperm(n_pages, generator=g)[: n_pages * 3 // 4]).values
    live = torch.unique(torch.cat([torch.tensor([0]), live]))
    return (live.unsqueeze(1) * block + torch.arange(block)).reshape(-1)


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("rule", ["all", "majority", "any"])
def test_plan_pages_split_over_workers_equals_unsplit(rule, workers):
    g = torch.Generator().manual_seed(1)
    pos = positions_with_holes()
    n, layers, kv = pos.numel(), 3, 4
    # per-page eviction tendencies so that whole pages are evicted by some heads only
    p_evict = torch.rand(layers, kv, n // 16, 1, generator=g).expand(-1, -1, -1, 16).reshape(layers, kv, n)
    masks = [torch.rand(kv, n, generator=g) >= p_evict[layer] ** 0.3 for layer in range(layers)]
    want = plan_pages(masks, pos, 16, rule=rule, protect_from_position=int(pos.max()) - 20)
    group = FakeGroup(workers)
    got = group.run(lambda r, reduce: plan_pages([heads(m, r, workers) for m in masks], pos, 16, rule=rule,
                                                 protect_from_position=int(pos.max()) - 20, reduce=reduce))
    for plan in got:
        same_plan(plan, want)
    assert group.calls == [["sum"]] * workers  # one collective per call
    alone = [plan_pages([heads(m, r, workers) for m in masks], pos, 16, rule=rule,
                        protect_from_position=int(pos.max()) - 20) for r in range(workers)]
    assert any(a.free_pages != want.free_pages or a.requested != want.requested for a in alone), \
        "the check is empty: one worker alone already decides like all of them"
    assert want.free_pages or rule == "all"


@pytest.mark.parametrize("aggregate", ["max", "mean", "vote"])
def test_select_pages_split_over_workers_equals_unsplit(aggregate):
    g = torch.Generator().manual_seed(2)
    pos = positions_with_holes(seed=3)
    n, layers, kv, workers = pos.numel(), 2, 4, 2
    scores = [torch.randn(kv, n, generator=g) * (layer + 1) for layer in range(layers)]
    masks = [torch.rand(kv, n, generator=g) > 0.5 for _ in range(layers)]
    protected = torch.zeros(n, dtype=torch.bool)
    protected[-7:] = True
    kwargs = dict(keep_tokens=96, aggregate=aggregate, protected_token_mask=protected)
    want = select_pages(scores, pos, 16, keep_masks=masks, **kwargs)
    group = FakeGroup(workers)
    got = group.run(lambda r, reduce: select_pages([heads(s, r, workers) for s in scores], pos, 16,
                                                   keep_masks=[heads(m, r, workers) for m in masks],
                                                   reduce=reduce, **kwargs))
    for plan in got:
        same_plan(plan, want)
    assert group.calls == [["sum", "max"]] * workers
    assert want.free_pages
    alone = [select_pages([heads(s, r, workers) for s in scores], pos, 16, keep_masks=[heads(m, r, workers)
                                                                                      for m in masks], **kwargs)
             for r in range(workers)]
    assert any(a.free_pages != want.free_pages or a.requested != want.requested for a in alone)
    # without keep masks the statistics are the freed entries, over every worker's heads
    plain = select_pages(scores, pos, 16, **kwargs)
    split = FakeGroup(workers).run(lambda r, reduce: select_pages([heads(s, r, workers) for s in scores], pos, 16,
                                                                  reduce=reduce, **kwargs))
    for plan in split:
        same_plan(plan, plain)


def test_select_pages_split_with_no_tokens():
    pos = torch.zeros(0, dtype=torch.long)
    got = FakeGroup(2).run(lambda r, reduce: select_pages([torch.zeros(1, 0)], pos, 16, keep_tokens=8, reduce=reduce))
    assert all(p.free_pages == [] and p.token_keep.numel() == 0 for p in got)


# ---------------------------------------------------------------------------------------------
# whole engine steps: compute_steps on KV-head shards of one paged cache
# ---------------------------------------------------------------------------------------------
L, KV, H, D, BS = 2, 2, 4, 32, 16


def random_weights(tmp_path) -> Any:
    from vllm_namm.scorers import ScorerConfig
    from vllm_namm.weights import NammWeights, save_weights

    w = NammWeights.zeros(ScorerConfig(kind="bam"))
    w.params = 0.3 * torch.randn(w.params.shape, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "random-bam.safetensors"
    save_weights(path, w)
    return path


def run_sharded(cfg: EvictionConfig, workers: int, reduce: Callable | None, rank: int, n_tokens: int = 1300,
                n_requests: int = 3) -> list[tuple[list[int], list[list[int]], list[list[int]]]]:
    """Worker ``rank`` of ``workers`` through every step of a toy paged cache: per request its
    freed pages and the per-step requested/realised statistics."""
    g = torch.Generator().manual_seed(0)
    policy = make_policy(cfg)
    pool = n_requests * (-(-n_tokens // BS)) + 1
    cache = torch.randn(pool, KV, BS, 2 * D, generator=g)
    queries = torch.randn(n_requests, L, n_tokens, H, D, generator=g)
    kv, hq = KV // workers, H // workers
    cache = cache[:, rank * kv : (rank + 1) * kv].contiguous()  # this worker's KV heads
    queries = queries[..., rank * hq : (rank + 1) * hq, :]  # and the query heads that read them
    import namm_kernels as nk

    layout = nk.PagedKeyLayout.flash(cache)
    tables = torch.randperm(pool, generator=g)[: pool - 1].view(n_requests, -1)
    mems = [RequestMemory(policy, L, BS) for _ in range(n_requests)]
    stats: list[tuple[list[list[int]], list[list[int]]]] = [([], []) for _ in mems]
    for start in range(0, n_tokens, cfg.interval):
        n = min(cfg.interval, n_tokens - start)
        jobs = []
        for r, mem in enumerate(mems):
            mem.add_queries([queries[r, layer, start : start + n] for layer in range(L)], start)
            if mem.due(cfg.interval, n_tokens):
                reader = PagedCacheReader([(cache, layout)] * L, tables[r, mem.live_pages].long(), D**-0.5,
                                          backend=cfg.kernels)
                jobs.append(begin_step(mem, reader, req_id=str(r)))
        for result in compute_steps(jobs, cfg, D**-0.5, kv, reduce=reduce):
            mem = result.job.mem
            mem.evicted_pages.update(result.plan.free_pages)
            mem.pending = False
            stats[int(result.job.req_id)][0].append(result.plan.requested)
            stats[int(result.job.req_id)][1].append(result.plan.realised)
    return [(sorted(m.evicted_pages), *s) for m, s in zip(mems, stats, strict=True)]


@pytest.mark.parametrize("policy", ["namm", "h2o-page", "snapkv-page", "l2-token", "streaming"])
def test_compute_steps_sharded_over_kv_heads_equals_one_worker(policy, tmp_path):
    extra: dict = {"page_rule": "majority"}
    if policy == "namm":
        extra |= {"policy": "namm", "weights": random_weights(tmp_path)}
    else:
        name, _, selection = policy.partition("-")
        extra |= {"policy": name, "budget": {"ratio": 0.3}, "selection": selection or "page"}
    cfg = EvictionConfig(kernels="torch", interval=256, **extra)
    want = run_sharded(cfg, 1, None, 0)
    group = FakeGroup(2)
    got = group.run(lambda r, reduce: run_sharded(cfg, 2, reduce, r))
    assert got[0] == want and got[1] == want
    assert any(pages for pages, _, _ in want), "the check is empty: nothing was freed"
    if policy not in ("streaming",):  # position-only policies agree even unreduced
        alone = run_sharded(cfg, 2, None, 0)
        assert alone != want, "the check is empty: one worker's heads alone give the same plans and statistics"


def test_a_failure_on_one_worker_drops_the_batch_everywhere(tmp_path):
    """A worker whose part of a step fails still takes part in the collectives, so its peers do
    not wait forever; then every worker drops the batch (none frees a page the others keep)."""
    cfg = EvictionConfig(kernels="torch", interval=256, policy="h2o", budget={"ratio": 0.3})
    policy = make_policy(cfg)
    g = torch.Generator().manual_seed(0)

    class Broken:
        def keys(self, *args):
            raise MemoryError("out of memory on this worker")

        columns = paged_features = keys

    def step(rank: int, reduce: Callable) -> BaseException | None:
        mem = RequestMemory(policy, L, BS)
        cache = torch.randn(40, 1, BS, 2 * D, generator=torch.Generator().manual_seed(rank))
        import namm_kernels as nk

        mem.add_queries([torch.randn(512, 2, D, generator=g) for _ in range(L)], 0)
        reader = Broken() if rank == 1 else PagedCacheReader(
            [(cache, nk.PagedKeyLayout.flash(cache))] * L, torch.arange(32), D**-0.5, backend="torch")
        try:
            compute_steps([begin_step(mem, reader)], cfg, D**-0.5, 1, reduce=reduce)
        except BaseException as e:  # noqa: BLE001
            return e
        return None

    errors = FakeGroup(2).run(step)
    assert isinstance(errors[1], MemoryError)
    assert isinstance(errors[0], PeerStepError)
