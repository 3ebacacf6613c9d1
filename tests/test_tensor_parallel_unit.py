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
from vllm_namm.page_plan import PagePlan, PagesByBudget, PagesByRule, plan_pages, select_pages
from vllm_namm.policies import make_policy
from vllm_namm.request_memory import PagedCacheReader, PeerStepError, RequestMemory, begin_step, compute_steps


class FakeGroup:
    """``n`` in-process workers whose ``reduce(t, op)`` behaves like an all-reduce over them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=300)  # bounds a deadlock only (busy machine)
        self.slots: list[torch.Tensor | None] = [None] * n
        self.calls: list[list[str]] = [[] for _ in range(n)]

    def reduce_for(self, rank: int) -> Callable[[torch.Tensor, str], torch.Tensor]:
        def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.calls[rank].append(op)
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            parts = list(self.slots)
            assert all(p is not None and p.shape == t.shape and p.dtype == t.dtype for p in parts), (
                "workers disagree on a collective's shape: their batches differ"
            )
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
    want = plan_pages(PagesByRule(masks, pos, 16, rule=rule, protect_from_position=int(pos.max()) - 20))
    group = FakeGroup(workers)
    got = group.run(
        lambda r, reduce: plan_pages(
            PagesByRule(
                [heads(m, r, workers) for m in masks],
                pos,
                16,
                rule=rule,
                protect_from_position=int(pos.max()) - 20,
            ),
            reduce=reduce,
        )
    )
    for plan in got:
        same_plan(plan, want)
    assert group.calls == [["sum"]] * workers  # one collective per call
    alone = [
        plan_pages(
            PagesByRule(
                [heads(m, r, workers) for m in masks],
                pos,
                16,
                rule=rule,
                protect_from_position=int(pos.max()) - 20,
            )
        )
        for r in range(workers)
    ]
    assert any(a.free_pages != want.free_pages or a.requested != want.requested for a in alone), (
        "the check is empty: one worker alone already decides like all of them"
    )
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
    want = select_pages(PagesByBudget(scores, pos, 16, keep_masks=masks, **kwargs))
    group = FakeGroup(workers)
    got = group.run(
        lambda r, reduce: select_pages(
            PagesByBudget(
                [heads(s, r, workers) for s in scores],
                pos,
                16,
                keep_masks=[heads(m, r, workers) for m in masks],
                **kwargs,
            ),
            reduce=reduce,
        )
    )
    for plan in got:
        same_plan(plan, want)
    assert group.calls == [["sum", "max"]] * workers
    assert want.free_pages
    alone = [
        select_pages(
            PagesByBudget(
                [heads(s, r, workers) for s in scores],
                pos,
                16,
                keep_masks=[heads(m, r, workers) for m in masks],
                **kwargs,
            )
        )
        for r in range(workers)
    ]
    assert any(a.free_pages != want.free_pages or a.requested != want.requested for a in alone)
    # without keep masks the statistics are the freed entries, over every worker's heads
    plain = select_pages(PagesByBudget(scores, pos, 16, **kwargs))
    split = FakeGroup(workers).run(
        lambda r, reduce: select_pages(
            PagesByBudget([heads(s, r, workers) for s in scores], pos, 16, **kwargs), reduce=reduce
        )
    )
    for plan in split:
        same_plan(plan, plain)


def test_select_pages_split_with_no_tokens():
    pos = torch.zeros(0, dtype=torch.long)
    got = FakeGroup(2).run(
        lambda r, reduce: select_pages(
            PagesByBudget([torch.zeros(1, 0)], pos, 16, keep_tokens=8), reduce=reduce
        )
    )
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


def run_sharded(
    cfg: EvictionConfig,
    tp: int,
    pp: int,
    reduce: Callable | None,
    rank: int,
    n_tokens: int = 1300,
    n_requests: int = 3,
) -> list[tuple[list[int], list[list[int]], list[list[int]]]]:
    """Worker ``rank`` of ``tp x pp`` (vLLM's layout: stage-major) through every step of a toy
    paged cache: per request its freed pages and the per-step requested/realised statistics.
    A tensor-parallel rank holds ``KV / tp`` KV heads, a pipeline stage ``L / pp`` layers."""
    g = torch.Generator().manual_seed(0)
    policy = make_policy(cfg)
    pool = n_requests * (-(-n_tokens // BS)) + 1
    caches = torch.randn(L, pool, KV, BS, 2 * D, generator=g)
    queries = torch.randn(n_requests, L, n_tokens, H, D, generator=g)
    stage, t = divmod(rank, tp)
    kv, hq, n_layers = KV // tp, H // tp, L // pp
    first = stage * n_layers
    caches = caches[
        first : first + n_layers, :, t * kv : (t + 1) * kv
    ].contiguous()  # this worker's layers and heads
    queries = queries[
        :, first : first + n_layers, :, t * hq : (t + 1) * hq
    ]  # and the query heads that read them
    import namm_kernels as nk

    layers = [(c, nk.PagedKeyLayout.flash(c)) for c in caches]
    tables = torch.randperm(pool, generator=g)[: pool - 1].view(n_requests, -1)
    mems = [RequestMemory(policy, n_layers, BS) for _ in range(n_requests)]
    stats: list[tuple[list[list[int]], list[list[int]]]] = [([], []) for _ in mems]
    for start in range(0, n_tokens, cfg.interval):
        n = min(cfg.interval, n_tokens - start)
        jobs = []
        for r, mem in enumerate(mems):
            mem.add_queries([queries[r, layer, start : start + n] for layer in range(n_layers)], start)
            if mem.due(cfg.interval, n_tokens):
                reader = PagedCacheReader(
                    layers, tables[r, mem.live_pages].long(), D**-0.5, backend=cfg.kernels
                )
                jobs.append(begin_step(mem, reader, req_id=str(r)))
        for step in compute_steps(
            jobs, cfg, D**-0.5, kv, reduce=reduce, layers=(first, L) if pp > 1 else None
        ):
            step.finish()
            stats[int(step.req_id)][0].append(step.plan.requested)
            stats[int(step.req_id)][1].append(step.plan.realised)
    return [(sorted(m.evicted_pages), *s) for m, s in zip(mems, stats, strict=True)]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("policy", ["namm", "h2o-page", "snapkv-page", "l2-token", "streaming"])
def test_compute_steps_sharded_equals_one_worker(policy, tp, pp, tmp_path):
    """Workers holding KV-head slices (tensor parallel), layer slices (pipeline parallel) or
    both free the pages one worker frees, with the same statistics."""
    extra: dict = {"page_rule": "majority"}
    if policy == "namm":
        extra |= {"policy": "namm", "weights": random_weights(tmp_path)}
    else:
        name, _, selection = policy.partition("-")
        extra |= {"policy": name, "budget": {"ratio": 0.3}, "selection": selection or "page"}
    cfg = EvictionConfig(kernels="torch", interval=256, **extra)
    want = run_sharded(cfg, 1, 1, None, 0)
    got = FakeGroup(tp * pp).run(lambda r, reduce: run_sharded(cfg, tp, pp, reduce, r))
    assert all(g == want for g in got)
    assert any(pages for pages, _, _ in want), "the check is empty: nothing was freed"
    alone = run_sharded(cfg, tp, pp, None, 0)
    assert alone != want, "the check is empty: one worker's part alone gives the same plans and statistics"


def test_a_failure_on_one_worker_drops_the_batch_everywhere(tmp_path):
    """A worker whose part of a step fails still takes part in the collectives, so its peers do
    not wait forever; then every worker drops the batch (none frees a page the others keep)."""
    cfg = EvictionConfig(kernels="torch", interval=256, policy="h2o", budget={"ratio": 0.3})
    policy = make_policy(cfg)
    g = torch.Generator().manual_seed(0)

    class Broken:
        def keys(self, *args):
            raise MemoryError("out of memory on this worker")

        columns = column_sums = paged_features = keys

    def step(rank: int, reduce: Callable) -> BaseException | None:
        mem = RequestMemory(policy, L, BS)
        cache = torch.randn(40, 1, BS, 2 * D, generator=torch.Generator().manual_seed(rank))
        import namm_kernels as nk

        mem.add_queries([torch.randn(512, 2, D, generator=g) for _ in range(L)], 0)
        reader = (
            Broken()
            if rank == 1
            else PagedCacheReader(
                [(cache, nk.PagedKeyLayout.flash(cache))] * L, torch.arange(32), D**-0.5, backend="torch"
            )
        )
        try:
            compute_steps([begin_step(mem, reader)], cfg, D**-0.5, 1, reduce=reduce)
        except BaseException as e:  # noqa: BLE001
            return e
        return None

    errors = FakeGroup(2).run(step)
    assert isinstance(errors[1], MemoryError)
    assert isinstance(errors[0], PeerStepError)


# ---------------------------------------------------------------------------------------------
# engine options and the launcher (no engine started)
# ---------------------------------------------------------------------------------------------
def engine_args(**kwargs: Any) -> Any:
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model="x", **kwargs)


def test_parallelism_checks():
    from vllm_namm.vllm_patch.engine_config import NammConfigError, check_parallelism

    cfg = EvictionConfig(policy="streaming", budget={"tokens": 512})
    for lag in (0, 1, 2):  # pipeline parallelism is refused at any lag
        with pytest.raises(NammConfigError, match="does not support --pipeline-parallel-size"):
            check_parallelism(engine_args(pipeline_parallel_size=2), cfg.model_copy(update={"lag": lag}))
    check_parallelism(engine_args(tensor_parallel_size=2), cfg.model_copy(update={"lag": 0}))
    for attr, flag in (
        ("decode_context_parallel_size", "--decode-context-parallel-size"),
        ("prefill_context_parallel_size", "--prefill-context-parallel-size"),
    ):
        with pytest.raises(NammConfigError, match=flag):
            check_parallelism(engine_args(tensor_parallel_size=2, **{attr: 2}), cfg)


def test_gpu_cuda_graphs_become_piecewise():
    """On GPU eviction keeps CUDA graphs around everything but attention (written from vLLM
    0.32's config code; there is no vLLM GPU build here, so only the settings are checked)."""
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from vllm_namm.vllm_patch.engine_config import NammConfigError, piecewise_cuda_graphs

    args = engine_args()  # vLLM's default on GPU would be FULL_AND_PIECEWISE
    piecewise_cuda_graphs(args)
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    for asked in ("FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):
        args = engine_args(compilation_config={"cudagraph_mode": asked})
        piecewise_cuda_graphs(args)
        assert args.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE, asked
    args = engine_args(compilation_config={"cudagraph_mode": "NONE"})
    piecewise_cuda_graphs(args)
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    args = engine_args(enforce_eager=True)
    piecewise_cuda_graphs(args)
    assert args.compilation_config.cudagraph_mode is None  # eager: vLLM turns graphs off itself
    args = engine_args(
        compilation_config={
            "mode": CompilationMode.STOCK_TORCH_COMPILE,
            "cudagraph_mode": "FULL_AND_PIECEWISE",
        }
    )
    piecewise_cuda_graphs(args)  # no piecewise graphs without vLLM's compiler: no graphs at all
    assert args.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    with pytest.raises(NammConfigError, match="splitting_ops"):
        piecewise_cuda_graphs(engine_args(compilation_config={"splitting_ops": []}))


def test_launcher_sets_cpu_thread_binding_for_several_workers(monkeypatch):
    from benchmarks.launch import VllmServer, omp_threads_bind, parallel_world_size

    assert parallel_world_size(["--tensor-parallel-size", "2"]) == 2
    assert parallel_world_size(["-tp=2", "--pipeline-parallel-size", "2", "--x", "3"]) == 4
    assert parallel_world_size(["--dtype", "float32"]) == 1
    assert omp_threads_bind(1) is None
    assert omp_threads_bind(2, cpus=[0, 1], nodes=1) == "0|1"
    assert omp_threads_bind(2, cpus=range(7), nodes=1) == "0,1,2|3,4,5"  # the spare CPU stays free
    assert omp_threads_bind(2, cpus=range(8), nodes=2) is None  # one NUMA node per worker: vLLM's own
    with pytest.raises(ValueError, match="at least 4 CPUs"):
        omp_threads_bind(4, cpus=[0, 1], nodes=1)
    server = VllmServer("m", tensor_parallel_size=2, env={"VLLM_CPU_OMP_THREADS_BIND": "auto"})
    assert server.command[-2:] == ["--tensor-parallel-size", "2"]
    assert server.env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"  # the caller's choice wins
    import benchmarks.launch as launch

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr(launch, "numa_nodes", lambda: 1)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert VllmServer("m", ["--tensor-parallel-size", "2"]).env["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in VllmServer("m").env
