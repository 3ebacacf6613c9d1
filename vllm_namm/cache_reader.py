"""How an eviction step reads one request's cached keys: from a function (tests, reference checks)
or from the engine's paged KV cache, bound to a snapshot of the request's live block ids so that it
stays valid while the engine moves on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from vllm_namm import kernels
from vllm_namm.policies.namm import PagedFeatures
from vllm_namm.settings import FeatureConfig


class CacheReader(Protocol):
    """How a step reads one request's cached keys; the engine binds it to a snapshot of the
    request's live block ids, so it stays valid while the engine moves on."""

    def keys(self, layer: int) -> Tensor:
        """Cached keys of the live pages, [n_live_tokens (+ padding of the last page), kv_heads, d]."""
        ...

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        """Attention columns [kv_heads, n_q, n] straight from the cache, or None (then: from keys)."""
        ...

    def column_sums(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        """The columns summed over the queries [kv_heads, n], never writing the columns, or None."""
        ...

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        """The fused STFT+EMA source for NAMM (GPU), or None."""
        ...


@dataclass
class KeysReader:
    """A :class:`CacheReader` over a function ``read_keys(layer)`` (tests, reference checks)."""

    read_keys: Callable[[int], Tensor]

    def keys(self, layer: int) -> Tensor:
        return self.read_keys(layer)

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        return None

    def column_sums(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        return None

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        return None


@dataclass
class PagedCacheReader:
    """A :class:`CacheReader` over a paged KV cache (the engine's), bound to a snapshot of one
    request's live block ids. ``layers[l]`` = (cache tensor, :class:`~vllm_namm.kernels.PagedKeyLayout`).

    ``fused``: NAMM's spectral features come from the fused paged STFT+EMA kernel (Triton on
    GPU; window 32 / hop 16 only), which never materialises the attention columns.

    On the torch side (CPU) a layer's keys are gathered once, whoever asks first (the key-norm
    feature or the columns): the reader keeps the last layer it gathered.
    """

    layers: list[tuple[Tensor, Any]]
    blocks: Tensor
    """[n_live_pages] int64 physical block ids, oldest page first."""
    scale: float
    backend: kernels.Backend = "auto"
    fused: bool = False
    _gathered: tuple[int, Tensor] | None = field(default=None, init=False, repr=False)

    def _blocks(self, cache: Tensor) -> Tensor:
        return self.blocks.to(cache.device)

    def keys(self, layer: int) -> Tensor:
        if self._gathered is not None and self._gathered[0] == layer:
            return self._gathered[1]
        cache, layout = self.layers[layer]
        keys = kernels.gather_keys(cache, layout, self._blocks(cache))
        self._gathered = (layer, keys)
        return keys

    def _torch_side(self, queries: Tensor) -> bool:
        return kernels.resolve_backend(self.backend, queries) == "torch" and not queries.is_cuda

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        cache, layout = self.layers[layer]
        dev = cache.device
        if self._torch_side(queries):
            n = positions.numel()
            return kernels.attention_columns_dense(
                queries, self.keys(layer)[:n], positions, query_positions, self.scale
            )
        return kernels.attention_columns_paged(
            queries.to(dev),
            cache,
            layout,
            self._blocks(cache),
            positions.to(dev),
            query_positions.to(dev),
            self.scale,
            backend=self.backend,
        )

    def column_sums(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        if not self._torch_side(queries):
            return None  # GPU: the columns kernel, then a sum
        n = positions.numel()
        return kernels.attention_column_sums_dense(
            queries, self.keys(layer)[:n], positions, query_positions, self.scale
        )

    def paged_features(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> PagedFeatures | None:
        if not self.fused:
            return None
        cache, layout = self.layers[layer]
        dev = cache.device
        q, qpos, pos, blocks = (
            queries.to(dev),
            query_positions.to(dev),
            positions.to(dev),
            self._blocks(cache),
        )

        def features(
            prev_pad: Tensor, prev_ema: Tensor, first: Tensor, cfg: FeatureConfig
        ) -> tuple[Tensor, Tensor]:
            return kernels.paged_spectrogram_ema(
                q,
                cache,
                layout,
                blocks,
                pos,
                qpos,
                self.scale,
                prev_pad,
                prev_ema,
                first.to(dev),
                cfg.gamma,
                backend=self.backend,
                n_fft=cfg.n_w,
                hop=cfg.s_w,
            )

        return features
