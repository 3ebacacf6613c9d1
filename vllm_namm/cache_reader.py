"""How an eviction step reads one request's cached keys: from a function (tests, reference checks)
or from the engine's paged KV cache, bound to a snapshot of the request's live block ids so that it
stays valid while the engine moves on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    """

    layers: list[tuple[Tensor, Any]]
    blocks: Tensor
    """[n_live_pages] int64 physical block ids, oldest page first."""
    scale: float
    backend: kernels.Backend = "auto"
    fused: bool = False

    def _blocks(self, cache: Tensor) -> Tensor:
        return self.blocks.to(cache.device)

    def keys(self, layer: int) -> Tensor:
        cache, layout = self.layers[layer]
        return kernels.gather_keys(cache, layout, self._blocks(cache))

    def columns(
        self, layer: int, queries: Tensor, query_positions: Tensor, positions: Tensor
    ) -> Tensor | None:
        cache, layout = self.layers[layer]
        dev = cache.device
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
