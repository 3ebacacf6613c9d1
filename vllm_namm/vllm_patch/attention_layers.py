"""This worker's attention layers, as eviction sees them: their queries and their paged keys.

Found in the runner's ``static_forward_context``: the layers of the KV-cache groups eviction frees
pages in (:mod:`.kv_groups`), sorted by layer index and checked (no sliding window, no ALiBi, one
scale and head shape). Each one's ``impl.forward`` is wrapped so that, while
:attr:`AttentionLayers.capturing`, the step's queries are kept for the request memories; the other
layers (sliding-window ones, left to vLLM) run untouched.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from vllm_namm import kernels
from vllm_namm.vllm_patch.patching import patch


class AttentionLayers:
    """The attention layers of one model runner, and the queries they saw this engine step."""

    def __init__(self, runner: Any, names: Collection[str] | None = None) -> None:
        """``names``: the layers eviction frees pages of (None: every attention layer)."""
        from vllm.model_executor.layers.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        ctx = runner.compilation_config.static_forward_context
        layers = [
            (name, mod)
            for name, mod in ctx.items()
            if isinstance(mod, Attention) and (names is None or name in names)
        ]
        layers.sort(key=lambda item: extract_layer_index(item[0]))
        if not layers:
            raise RuntimeError("vllm-namm: no attention layers found to evict from")
        self.names = [name for name, _ in layers]
        self.modules = [mod for _, mod in layers]
        self.ids = [extract_layer_index(name) for name in self.names]
        for name, mod in layers:
            if (
                getattr(mod.impl, "sliding_window", None) not in (None, -1)
                or getattr(mod.impl, "alibi_slopes", None) is not None
            ):
                raise RuntimeError(
                    f"vllm-namm: layer {name} has sliding-window or ALiBi attention and shares a KV-cache group "
                    "with evicted layers (compacting the cache would change in-kernel distances)"
                )
        first = self.modules[0]
        shapes = {(float(m.impl.scale), m.num_kv_heads, m.head_size) for m in self.modules}
        if len(shapes) > 1:
            raise RuntimeError(f"vllm-namm: evicted layers differ in scale or head shape: {sorted(shapes)}")
        self.scale: float = float(first.impl.scale)
        self.num_kv_heads: int = first.num_kv_heads
        self.head_size: int = first.head_size
        self.backend = type(first.impl).__name__
        self.capturing = False
        self.captured: list[torch.Tensor | None] = [None] * len(self.modules)
        for idx, mod in enumerate(self.modules):
            self._wrap_forward(mod, idx)

    def __len__(self) -> int:
        return len(self.modules)

    def start(self, capturing: bool) -> None:
        """A new engine step: capture its queries (or not), forgetting the previous step's."""
        self.capturing = capturing
        self.captured = [None] * len(self.modules)

    def queries(self) -> list[torch.Tensor] | None:
        """This step's queries of every layer [n_tokens, q_heads, head_size], or None if one is missing."""
        if any(q is None for q in self.captured):
            return None
        return self.captured  # type: ignore[return-value]

    def key_layouts(
        self, indices: Collection[int] | None = None
    ) -> list[tuple[torch.Tensor, kernels.PagedKeyLayout]]:
        """Paged key layouts of the layers (of those at ``indices``, in that order)."""
        mods = self.modules if indices is None else [self.modules[i] for i in indices]
        return [key_layout(mod, self.backend) for mod in mods]

    def _wrap_forward(self, layer: Any, idx: int) -> None:
        state = self

        @patch(layer.impl, "forward")  # this layer's impl only (an instance: original is bound)
        def forward(
            original, attn_layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
        ):
            result = original(attn_layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            if state.capturing and attn_metadata is not None:
                n = attn_metadata.num_actual_tokens
                state.captured[idx] = query[:n].detach().reshape(n, -1, state.head_size).clone()
            return result


def key_layout(layer: Any, backend: str) -> tuple[torch.Tensor, kernels.PagedKeyLayout]:
    """The paged key layout of one attention layer (see :mod:`vllm_namm.kernels`).

    CPU_ATTN packs keys per ISA (``vec``: transposed inside a block; ``amx``: VNNI tiles),
    FlashAttention-style backends keep ``[num_blocks, kv_heads, block_size, 2 * head_size]``.
    """
    kv_cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
    if backend.startswith("CPU"):
        return kv_cache, kernels.PagedKeyLayout.cpu(kv_cache, getattr(layer, "isa", "vec"))
    return kv_cache, kernels.PagedKeyLayout.flash(kv_cache, layer.head_size)
