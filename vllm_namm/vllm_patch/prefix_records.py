"""Eviction-aware prefix caching, the scheduler's half (issue 27): which step snapshots exist, under
which key, holding which pages, within which memory bound.

A worker takes a snapshot where an evicting request's step begins at a boundary B
(:mod:`vllm_namm.step_snapshots`) and announces it on its report. The scheduler keeps it as a
:class:`PrefixRecord` keyed by ``(settings fingerprint, block hash of the prefix below B)``: vLLM's
chained block hash covers every token below B (and the cache salt, LoRA, ...), the fingerprint
every setting the steps' outcome depends on (policy, weights, knobs, budget, interval, lag, page
rule, EMA coefficient, a candidate's parameters, block size). A later request with the same key
gets the record's live pages as its prefix-cache hit, holes as vLLM's null block (as for a sliding
window), and its workers restore the snapshot; requests with other settings, and ``none`` requests,
never see it.

Pages: those computed before the recording request's first eviction are vLLM's ordinary
prefix-cache blocks (full context); those written after it hold KV that depends on the eviction
history, so they are registered under a hash namespaced by the fingerprint, which no other
settings and no ordinary lookup can produce. Nothing is pinned: a record's blocks age in vLLM's
free queue like any cached block, so a lookup checks that every live page is still cached (and
the hit then references them), and a record that lost a page is dropped. What is bounded is the
workers' memory: the snapshots' policy states (``--kv-eviction-prefix-cache-mib`` per worker,
least recently used first out).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from vllm_namm.config import EvictionConfig
from vllm_namm.vllm_patch.channel import SnapshotNote

logger = logging.getLogger("vllm.namm")

NAMESPACE = b"vllm-namm/eviction-prefix/1"
Key = tuple[bytes, bytes]
"""(settings fingerprint, vLLM block hash of the prefix's last page)."""


def fingerprint(config: EvictionConfig, state_options: dict[str, Any], block_size: int) -> bytes:
    """Identity of everything an eviction step's outcome depends on besides the tokens."""
    data = {"config": config.model_dump(mode="json"), "request": state_options, "block_size": block_size}
    return hashlib.sha256(NAMESPACE + json.dumps(data, sort_keys=True, default=str).encode()).digest()


def namespaced(fp: bytes, block_hash: bytes) -> bytes:
    """The hash of a page written after an eviction, in its settings' namespace."""
    return hashlib.sha256(NAMESPACE + fp + bytes(block_hash)).digest()


@dataclass
class PrefixRecord:
    snapshot_id: int
    key: Key
    boundary: int
    pages: list[bytes | None]
    """Per logical page below the boundary: the cached block's hash (with group id), None for a hole."""
    stats: Any
    """The recording request's eviction statistics at the boundary (a restored request starts from them)."""
    nbytes: int


class PrefixRecords:
    """The records of one scheduler, least recently used first."""

    def __init__(self, block_pool: Any, group_id: int, block_size: int, max_bytes: int) -> None:
        self.pool = block_pool
        self.group_id = group_id
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._by_key: dict[Key, PrefixRecord] = {}
        self._lru: OrderedDict[int, PrefixRecord] = OrderedDict()
        self._drops: list[int] = []

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def pages(self) -> int:
        """Live pages the records refer to (cached blocks, not pinned)."""
        return sum(sum(p is not None for p in r.pages) for r in self._lru.values())

    def take_drops(self) -> list[int]:
        """Snapshot ids the workers may forget (sent with the next scheduler output)."""
        drops, self._drops = self._drops, []
        return drops

    def refuse(self, note: SnapshotNote) -> None:
        self._drops.append(note.snapshot_id)

    def clear(self) -> None:
        """Forget every record (the prefix cache was reset: their pages are gone)."""
        for record in list(self._lru.values()):
            self._drop(record)

    def add(self, fp: bytes, request: Any, blocks: list[Any], note: SnapshotNote, stats: Any) -> None:
        """Record the snapshot ``note`` of ``request`` (whose block list is ``blocks``), before the
        report's pages are freed: its post-eviction pages get their namespaced hash now, so that they
        stay findable once the request lets go of them."""
        n = note.boundary // self.block_size
        if note.boundary % self.block_size or not 0 < n <= min(len(request.block_hashes), len(blocks)):
            return self.refuse(note)
        key = (fp, bytes(request.block_hashes[n - 1]))
        old = self._by_key.get(key)
        if old is not None or note.nbytes > self.max_bytes:
            if old is not None:
                self._lru.move_to_end(old.snapshot_id)
            return self.refuse(note)
        holes, pages = set(note.holes), []
        for page in range(n):
            block = blocks[page]
            if (page in holes) != block.is_null:
                logger.error(
                    "vllm-namm: snapshot of %s at %d disagrees with the scheduler about page %d; not kept",
                    request.request_id,
                    note.boundary,
                    page,
                )
                return self.refuse(note)
            if block.is_null:
                pages.append(None)
                continue
            if block.block_hash is None:  # written after an eviction: the fingerprint's namespace only
                from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

                h = BlockHash(namespaced(fp, request.block_hashes[page]))
                self.pool._insert_block_hash(
                    make_block_hash_with_group_id(h, self.group_id),
                    block,
                    num_tokens=(page + 1) * self.block_size,
                )
            pages.append(block.block_hash)
        record = PrefixRecord(note.snapshot_id, key, note.boundary, pages, copy.deepcopy(stats), note.nbytes)
        self._by_key[key] = record
        self._lru[record.snapshot_id] = record
        self.nbytes += record.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._lru.values())))

    def lookup(self, fp: bytes, request: Any) -> tuple[PrefixRecord, list[Any]] | None:
        """The longest record of these settings for a prefix of ``request`` that leaves at least one
        token to compute, with its blocks (vLLM's null block for holes); records that lost a page are
        dropped on the way."""
        n = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        for i in range(n, 0, -1):
            record = self._by_key.get((fp, bytes(request.block_hashes[i - 1])))
            if record is None:
                continue
            blocks = self._blocks(record)
            if blocks is None:
                self._drop(record)
                continue
            self._lru.move_to_end(record.snapshot_id)
            return record, blocks
        return None

    def _blocks(self, record: PrefixRecord) -> list[Any] | None:
        out = []
        for h in record.pages:
            block = (
                self.pool.null_block if h is None else self.pool.cached_block_hash_to_block.get_one_block(h)
            )
            if block is None:
                return None
            out.append(block)
        return out

    def _drop(self, record: PrefixRecord) -> None:
        self._by_key.pop(record.key, None)
        if self._lru.pop(record.snapshot_id, None) is not None:
            self.nbytes -= record.nbytes
            self._drops.append(record.snapshot_id)
