"""Which of vLLM's KV-cache groups eviction frees pages in, and one group per layer when asked.

vLLM 0.32 splits a model's attention layers into KV-cache groups (``kv_cache_utils.get_kv_cache_groups``):
one for a plain model, several for a hybrid one (Gemma 3: its sliding-window layers and its
full-attention layers; the groups share one block pool, each keeps its own block table per request).

* **Evicted groups**: plain full attention (``FullAttentionSpec`` with no window or chunk). Keys are
  cached after RoPE, so dropping pages from a row of the block table changes no distance the kernel
  sees; each group gets its own page plans, holes and compaction.
* **Left to vLLM**: sliding-window and chunked-local groups. vLLM already frees their blocks outside
  the window, and compacting them would change what falls inside it.
* **One group per layer** (``granularity`` "layer"): :func:`install` wraps ``get_kv_cache_groups`` so
  that every attention layer is a KV-cache group of its own. To vLLM that is a hybrid model with many
  groups; to eviction, each layer frees its own pages, as the paper evicts per layer. Every group is
  split (sliding ones too): groups share a pool whose blocks are as large as the largest group's, so
  one-layer groups beside three-layer ones would waste two thirds of each block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vllm_namm.vllm_patch.engine_config import eviction_config
from vllm_namm.vllm_patch.patching import patch


def is_evicted_spec(spec: Any) -> bool:
    """Whether eviction frees pages in a group of this spec: plain full attention only."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

    if isinstance(spec, UniformTypeKVCacheSpecs):
        return all(is_evicted_spec(s) for s in spec.kv_cache_specs.values())
    return (
        type(spec) is FullAttentionSpec and spec.sliding_window is None and spec.attention_chunk_size is None
    )


def evicted_groups(kv_cache_config: Any) -> list[int]:
    """Indices of the KV-cache groups eviction frees pages in (see the module docstring)."""
    groups = kv_cache_config.kv_cache_groups
    found = [i for i, g in enumerate(groups) if is_evicted_spec(g.kv_cache_spec)]
    if not found:
        kinds = sorted({type(g.kv_cache_spec).__name__ for g in groups})
        raise RuntimeError(
            f"vllm-namm: no full-attention KV-cache group to evict from (groups: {', '.join(kinds)})"
        )
    return found


def one_group_per_layer(groups: list[Any]) -> list[Any]:
    """``groups`` split into one group per layer, in layer order."""
    from vllm.model_executor.models.utils import extract_layer_index
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    split = []
    for group in groups:
        for name in group.layer_names:
            spec = group.kv_cache_spec
            if isinstance(spec, UniformTypeKVCacheSpecs):
                spec = spec.kv_cache_specs[name]
            split.append(dataclasses.replace(group, layer_names=[name], kv_cache_spec=spec))
    split.sort(key=lambda g: extract_layer_index(g.layer_names[0]))
    return split


def install() -> None:
    """Per-layer pages: one KV-cache group per attention layer when eviction asks for it."""
    from vllm.v1.core import kv_cache_utils

    @patch(kv_cache_utils, "get_kv_cache_groups")  # a module function, looked up at each call
    def get_kv_cache_groups(original, vllm_config, kv_cache_spec, *args, **kwargs):
        groups = original(vllm_config, kv_cache_spec, *args, **kwargs)
        cfg = eviction_config(vllm_config)
        if cfg is None or cfg.granularity != "layer" or len(groups) < 1:
            return groups
        return one_group_per_layer(groups)
