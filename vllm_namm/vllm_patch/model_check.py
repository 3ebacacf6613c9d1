"""Which models eviction can serve, read from the model's config before any engine starts.

Checked in the API-server process right after vLLM has built its engine config
(``EngineArgs.create_engine_config``), so a model eviction cannot serve stops the server with one
line (exit 2) before a worker loads a weight; the worker only re-checks what it finds
(:mod:`.kv_groups`, :mod:`.attention_layers`) as a safety net.

Served: full-attention layers (evicted) beside sliding-window ones (left to vLLM, which frees their
out-of-window blocks itself: :mod:`.kv_groups`). Refused, each with its reason: no full-attention
layer at all, attention the eviction step cannot reproduce (ALiBi, soft-capped logits, MLA's
compressed cache), and layers that would share a KV-cache group with evicted ones without being
plain full attention (chunked local attention, sliding windows with the hybrid KV-cache manager off).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"


def layer_kinds(hf_text_config: Any) -> Counter[str]:
    """Attention kinds of the model's layers: ``layer_types`` when the config has them, else every
    layer sliding when it sets a sliding window (Mistral-style), else every layer full."""
    n = int(getattr(hf_text_config, "num_hidden_layers", 0) or 0)
    types = getattr(hf_text_config, "layer_types", None)
    if types:
        return Counter(str(t) for t in types)
    window = getattr(hf_text_config, "sliding_window", None)
    if window and getattr(hf_text_config, "use_sliding_window", True) is not False:
        return Counter({SLIDING: n})
    return Counter({FULL: n})


def unsupported_reason(model_config: Any, hybrid_manager: bool) -> str | None:
    """Why eviction cannot serve this model (one line), or None.

    ``model_config``: vLLM's ``ModelConfig`` (its HF text config and derived properties);
    ``hybrid_manager``: whether vLLM's hybrid KV-cache manager is on (sliding-window layers then get
    KV-cache groups of their own).
    """
    hf = model_config.hf_text_config
    name = getattr(hf, "model_type", None) or type(hf).__name__
    if getattr(model_config, "is_attention_free", False):
        return f"{name} has no attention layers: there is no KV cache to evict from"
    if getattr(model_config, "is_hybrid", False):
        return f"{name} mixes attention with state-space layers; eviction serves attention-only models"
    if getattr(model_config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model; eviction serves decoder-only models"
    if getattr(model_config, "use_mla", False):
        return f"{name} uses multi-head latent attention: its compressed cache holds no keys to score"
    if getattr(model_config, "uses_alibi", False):
        return f"{name} uses ALiBi: compacting the cache would change the distances ALiBi adds to attention"
    if getattr(hf, "attn_logit_softcapping", None):
        return (
            f"{name} soft-caps its attention logits ({hf.attn_logit_softcapping}): the eviction step's "
            "attention columns would not be the model's"
        )
    if getattr(model_config, "attention_chunk_size", None):
        return (
            f"{name} uses chunked local attention: vLLM 0.32 keeps it in the full-attention KV-cache group, "
            "where compacting the cache would move tokens between chunks"
        )
    kinds = layer_kinds(hf)
    other = sorted(k for k in kinds if k not in (FULL, SLIDING))
    if other:
        return f"{name} has {', '.join(other)} layers; eviction serves full- and sliding-window attention"
    if not kinds[FULL]:
        return (
            f"every attention layer of {name} has a sliding window ({getattr(hf, 'sliding_window', '?')} "
            "tokens): vLLM already frees what falls outside it, and no full-attention layer is left to evict from"
        )
    if kinds[SLIDING] and not hybrid_manager:
        return (
            f"{name} has sliding-window layers, and vLLM's hybrid KV-cache manager is off (by "
            "--disable-hybrid-kv-cache-manager or a KV connector), so they would share pages with the "
            "evicted layers; let vLLM keep it on"
        )
    return None


def check_model(vllm_config: Any) -> str | None:
    """:func:`unsupported_reason` for an engine config (None when eviction is off or can serve it)."""
    from vllm_namm.vllm_patch.engine_config import eviction_config

    if eviction_config(vllm_config) is None or vllm_config.model_config is None:
        return None
    disabled = getattr(vllm_config.scheduler_config, "disable_hybrid_kv_cache_manager", False)
    return unsupported_reason(vllm_config.model_config, hybrid_manager=not disabled)
