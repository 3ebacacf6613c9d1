"""Eviction-aware prefix caching without a server: step snapshots, records and the lagged replay.

* :class:`~vllm_namm.step_snapshots.StepSnapshot`: a request restored at a boundary goes on exactly
  as the request that recorded it (the same page plans at every later step, the same policy
  states), for every registered policy, with the step at the boundary applied at once (lag 0)
  or still pending (lag 2, 3). The runner's lag is replayed by a small simulator of its
  ``after_forward`` (one interval-aligned chunk per engine step, a step begun at engine step ``e``
  applied when ``e + lag`` has come).
* :class:`~vllm_namm.vllm_patch.prefix_records.PrefixRecords` on vLLM's own block pool: the key,
  the namespaced hash of pages written after an eviction, a page lost to reuse, the memory bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from vllm_namm.background import LaggedExecutor
from vllm_namm.cache_reader import KeysReader
from vllm_namm.config import BudgetConfig, EvictionConfig
from vllm_namm.policies import POLICY_NAMES, make_policy, policy_class
from vllm_namm.request_memory import EvictionStep, RequestMemory, begin_step, compute_steps
from vllm_namm.step_snapshots import SnapshotStore, StepSnapshot

BS, INTERVAL, LAYERS = 32, 256, 2
KV, H, D = 2, 4, 32
N_TOKENS = 6 * INTERVAL + 100
EVICTING = [name for name in POLICY_NAMES if policy_class(name).evicts]


def _config(name: str) -> EvictionConfig:
    budget = BudgetConfig(tokens=192) if policy_class(name).budget_rule == "required" else None
    return EvictionConfig(policy=name, interval=INTERVAL, budget=budget)


@dataclass
class Run:
    """What one simulated request did: each applied step's (engine step, free pages), its snapshots."""

    mem: RequestMemory
    applied: list[tuple[int, list[int]]]
    snapshots: dict[int, StepSnapshot]


def _simulate(
    cfg: EvictionConfig,
    keys: torch.Tensor,
    queries: torch.Tensor,
    mem: RequestMemory,
    start: int = 0,
    pending: EvictionStep | None = None,
) -> Run:
    """The runner's after_forward, one engine step per ``interval`` chunk from ``start``: queries in,
    the due step begun (and computed), then the steps whose lag has passed applied (a snapshot taken
    of each resumable one first). ``pending``: a restored step, as if begun the engine step before."""
    lag, queue, applied, snapshots = cfg.lag, [], [], {}
    if pending is not None:
        queue.append((-1 + lag, pending))
    now = 0
    for chunk_start in range(start, N_TOKENS, INTERVAL):
        n = min(INTERVAL, N_TOKENS - chunk_start)
        if n != INTERVAL:
            mem.canonical = False
        mem.add_queries(
            [queries[layer, chunk_start : chunk_start + n] for layer in range(LAYERS)], chunk_start
        )
        if mem.due(cfg.interval, N_TOKENS, mem.policy.hop):
            pages = tuple(mem.live_pages)
            reader = KeysReader(lambda layer, pages=pages: _read(keys, layer, pages))
            step = begin_step(mem, reader, mem.policy.hop, "r", cfg.interval)
            compute_steps([step], cfg, D**-0.5, KV)
            queue.append((now + lag, step))
        now += 1
        while queue and queue[0][0] <= now:
            _, step = queue.pop(0)
            if step.resumable and not step.restored:
                snapshots[step.num_tokens] = StepSnapshot.take(step, pending=lag >= 2)
            assert step.plan is not None
            applied.append((now, list(step.plan.free_pages)))
            step.finish()
    return Run(mem, applied, snapshots)


def _read(keys: torch.Tensor, layer: int, pages: tuple[int, ...]) -> torch.Tensor:
    idx = torch.cat([torch.arange(p * BS, (p + 1) * BS) for p in pages])
    return keys[layer][idx.clamp(max=keys.shape[1] - 1)]


def _state_tensors(mem: RequestMemory) -> list[torch.Tensor]:
    return [v for s in mem.states for v in vars(s).values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("lag", [0, 2, 3])  # lag 1 applies within the step that begins, as lag 0
@pytest.mark.parametrize("name", EVICTING)
def test_a_restored_request_goes_on_exactly_as_the_recording_one(name: str, lag: int) -> None:
    cfg = _config(name).model_copy(update={"lag": lag})
    policy = make_policy(cfg)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(LAYERS, N_TOKENS, KV, D, generator=g)
    queries = torch.randn(LAYERS, N_TOKENS, H, D, generator=g)
    original = _simulate(cfg, keys, queries, RequestMemory(policy, LAYERS, BS))
    assert original.snapshots, "a canonical history leaves snapshots"
    # every step begins at a boundary with nothing unscored: each interval (lag <= 1), every other one
    expected = list(range(INTERVAL, N_TOKENS, INTERVAL))[:: 1 if lag <= 1 else lag]
    assert sorted(original.snapshots) == expected
    for boundary, snapshot in original.snapshots.items():
        mem = RequestMemory(policy, LAYERS, BS, num_tokens=boundary)
        pending = snapshot.restore(mem, "r2")
        assert (pending is not None) == (lag >= 2)
        resumed = _simulate(cfg, keys, queries, mem, start=boundary, pending=pending)
        offset = boundary // INTERVAL
        later = [(at - offset, pages) for at, pages in original.applied if at > offset]
        assert resumed.applied == later, (boundary, resumed.applied, later)
        assert resumed.mem.evicted_pages == original.mem.evicted_pages
        assert resumed.mem.steps == original.mem.steps
        for a, b in zip(_state_tensors(resumed.mem), _state_tensors(original.mem), strict=True):
            assert torch.equal(a, b)


def test_snapshot_states_are_copies() -> None:
    """The recording request goes on with its states; a restored one gets its own copies."""
    cfg = _config("h2o")
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(LAYERS, N_TOKENS, KV, D, generator=g)
    queries = torch.randn(LAYERS, N_TOKENS, H, D, generator=g)
    run = _simulate(cfg, keys, queries, RequestMemory(make_policy(cfg), LAYERS, BS))
    snapshot = run.snapshots[INTERVAL * 3]
    acc = [s.acc.clone() for s in snapshot.states]  # type: ignore[attr-defined]
    mem = RequestMemory(make_policy(cfg), LAYERS, BS, num_tokens=snapshot.boundary)
    snapshot.restore(mem, "x")
    for s in mem.states:
        s.acc.add_(1.0)  # type: ignore[attr-defined]
    assert all(torch.equal(a, s.acc) for a, s in zip(acc, snapshot.states, strict=True))  # type: ignore[attr-defined]
    assert snapshot.nbytes == sum(a.numel() * a.element_size() for a in acc)


def test_only_canonical_histories_are_resumable() -> None:
    """A chunk shorter than the interval (decodes took part of the token budget) ends the history a
    request on its own would have: no snapshot from there on."""
    cfg = _config("streaming")
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(LAYERS, N_TOKENS, KV, D, generator=g)
    mem = RequestMemory(make_policy(cfg), LAYERS, BS)
    steps = []
    for start, n in ((0, 256), (256, 253), (509, 259), (768, 256)):
        if n != INTERVAL or start % INTERVAL:
            mem.canonical = False
        mem.add_queries([torch.randn(n, H, D, generator=g) for _ in range(LAYERS)], start)
        if mem.due(INTERVAL, N_TOKENS):
            step = begin_step(mem, KeysReader(lambda layer: keys[layer]), 16, "r", INTERVAL)
            compute_steps([step], cfg, D**-0.5, KV)
            step.finish()
            steps.append(step)
    assert [s.resumable for s in steps] == [True, False, False]


def test_snapshot_store_ids_and_drops() -> None:
    store = SnapshotStore()
    cfg = _config("l2")
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(LAYERS, N_TOKENS, KV, D, generator=g)
    queries = torch.randn(LAYERS, N_TOKENS, H, D, generator=g)
    run = _simulate(cfg, keys, queries, RequestMemory(make_policy(cfg), LAYERS, BS))
    ids = [store.add(s) for s in run.snapshots.values()]
    assert ids == list(range(1, len(ids) + 1))
    store.drop(ids[:1])
    with pytest.raises(RuntimeError, match="dropped"):
        store.get(ids[0])
    assert store.get(ids[1]) is run.snapshots[sorted(run.snapshots)[1]]


def test_lagged_executor_replays_a_restored_step_at_its_lag() -> None:
    """``submit_done`` queues results as if submitted at an earlier engine step, in application order."""
    ex: LaggedExecutor[int, int] = LaggedExecutor(lambda jobs: [j * 10 for j in jobs], lag=2)
    try:
        ex.submit([1])  # apply at 2
        ex.step()
        ex.submit_done([7], ex.now - 1)  # as if submitted with the first: apply at 2
        ex.submit([2])  # apply at 3
        ex.submit_done([8], ex.now - 1)  # apply at 2: before [2]
        ex.step()
        assert [f.result() for f in ex.due()] == [[10], [7], [8]]
        ex.step()
        assert [f.result() for f in ex.due()] == [[20]]
        with pytest.raises(ValueError):
            ex.submit_done([9], ex.now + 1)
    finally:
        ex.shutdown()


# ---------------------------------------------------------------------------------------------
# the scheduler's records, on vLLM's block pool
# ---------------------------------------------------------------------------------------------
@dataclass
class FakeRequest:
    request_id: str
    block_hashes: list[bytes]
    num_tokens: int


def _pool(num_blocks: int = 64):
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(num_blocks, enable_caching=True, hash_block_size=BS)


def _hashes(n: int, salt: bytes = b"") -> list[bytes]:
    import hashlib

    out, prev = [], b""
    for i in range(n):
        prev = hashlib.sha256(salt + prev + i.to_bytes(4, "big")).digest()
        out.append(prev)
    return out


def _cache_standard(pool, blocks, hashes: list[bytes], pages: range) -> None:
    from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

    for p in pages:
        pool._insert_block_hash(
            make_block_hash_with_group_id(BlockHash(hashes[p]), 0), blocks[p], (p + 1) * BS
        )


def _recorded(max_bytes: int = 10**6) -> tuple[object, object, list, FakeRequest, Callable[..., object]]:
    """A pool, records, a request of 12 pages: pages 0-3 cached as ordinary full-context blocks, pages
    5 and 7 evicted (holes), the rest written after the eviction (no hash)."""
    from vllm_namm.vllm_patch.channel import SnapshotNote
    from vllm_namm.vllm_patch.prefix_records import PrefixRecords

    pool = _pool()
    records = PrefixRecords(pool, 0, BS, max_bytes)
    blocks = pool.get_new_blocks(12)
    request = FakeRequest("r1", _hashes(12), 12 * BS + 5)
    _cache_standard(pool, blocks, request.block_hashes, range(4))
    for p in (5, 7):
        pool.free_blocks([blocks[p]])
        blocks[p] = pool.null_block

    def note(snapshot_id: int, boundary: int, nbytes: int = 100) -> SnapshotNote:
        holes = [p for p in (5, 7) if p < boundary // BS]
        return SnapshotNote(snapshot_id, boundary, holes, [], nbytes)

    return pool, records, blocks, request, note


def test_records_are_found_by_prefix_and_settings_with_holes_as_the_null_block() -> None:
    from vllm_namm.vllm_patch.prefix_records import namespaced

    pool, records, blocks, request, note = _recorded()
    fp, other = b"settings-a", b"settings-b"
    records.add(fp, request, blocks, note(1, 10 * BS), stats={"steps": 2})
    # post-eviction pages now carry a hash in the settings' namespace, ordinary pages keep theirs
    for p in (4, 6, 8, 9):
        assert blocks[p].block_hash[:-4] == namespaced(fp, request.block_hashes[p])
    assert blocks[0].block_hash[:-4] == request.block_hashes[0]
    later = FakeRequest("r2", request.block_hashes[:11] + _hashes(3, b"other"), 14 * BS)
    record, got = records.lookup(fp, later)
    assert record.boundary == 10 * BS and record.snapshot_id == 1
    assert [b.block_id for b in got] == [0 if p in (5, 7) else blocks[p].block_id for p in range(10)]
    assert got[5] is pool.null_block
    assert records.lookup(other, later) is None, "other settings never see it"
    short = FakeRequest("r3", request.block_hashes, 10 * BS)  # the boundary must leave a token to compute
    assert records.lookup(fp, short) is None
    differs = FakeRequest("r4", _hashes(12, b"x"), 14 * BS)
    assert records.lookup(fp, differs) is None
    # the same key again: the first record stays, the new snapshot is refused
    records.add(fp, request, blocks, note(2, 10 * BS), stats={})
    assert records.take_drops() == [2] and len(records) == 1


def test_a_record_that_lost_a_page_is_dropped() -> None:
    pool, records, blocks, request, note = _recorded()
    fp = b"settings"
    records.add(fp, request, blocks, note(1, 4 * BS), stats={})
    records.add(fp, request, blocks, note(2, 10 * BS), stats={})
    pool.free_blocks(reversed([b for b in blocks if not b.is_null]))  # finished: its pages age, tail first
    assert records.lookup(fp, FakeRequest("r2", request.block_hashes, 12 * BS))[0].boundary == 10 * BS
    # reuse takes the least recently freed blocks first: page 9's block (freed first) goes
    while blocks[9].block_hash is not None:
        pool.get_new_blocks(1)
    record, _ = records.lookup(fp, FakeRequest("r3", request.block_hashes, 12 * BS))
    assert record.boundary == 4 * BS, "the shorter record still has all its pages"
    assert records.take_drops() == [2] and len(records) == 1


def test_records_stay_within_their_memory_bound_least_recently_used_first() -> None:
    pool, records, blocks, request, note = _recorded(max_bytes=250)
    fp = b"settings"
    records.add(fp, request, blocks, note(1, 4 * BS, 100), stats={})
    records.add(fp, request, blocks, note(2, 8 * BS, 100), stats={})
    assert records.lookup(fp, FakeRequest("r", request.block_hashes[:5], 5 * BS + 1))[0].snapshot_id == 1
    records.add(fp, request, blocks, note(3, 10 * BS, 100), stats={})  # over 250: the LRU one goes
    assert records.take_drops() == [2] and records.nbytes == 200
    records.add(fp, request, blocks, note(4, 6 * BS, 300), stats={})  # larger than the bound
    assert records.take_drops() == [4]
    records.clear()
    assert sorted(records.take_drops()) == [1, 3] and records.nbytes == 0 and len(records) == 0


def test_a_snapshot_that_disagrees_with_the_scheduler_is_refused() -> None:
    pool, records, blocks, request, note = _recorded()
    bad = note(1, 10 * BS)
    bad = type(bad)(1, bad.boundary, [5], [], 100)  # page 7 is a hole for the scheduler
    records.add(b"fp", request, blocks, bad, stats={})
    assert records.take_drops() == [1] and len(records) == 0


@pytest.mark.parametrize(
    ("groups", "caching", "possible"), [(1, True, True), (1, False, False), (4, True, False)]
)
def test_snapshots_need_prefix_caching_and_one_kv_cache_group(groups: int, caching: bool, possible: bool):
    """Several KV-cache groups (a hybrid model, per-layer pages) mean several memories per request:
    the one decision both the scheduler and the workers read says no snapshots there."""
    from vllm_namm.vllm_patch.engine_config import snapshots_possible

    vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=caching),
        kv_transfer_config=None,
        kv_events_config=None,
    )
    kv_cache_config = SimpleNamespace(kv_cache_groups=[object()] * groups)
    assert snapshots_possible(vllm_config, kv_cache_config) is possible
