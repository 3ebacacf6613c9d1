"""KV-cache groups without an engine (issue 29): which groups evict, per-layer groups, layer budgets,
and which models are refused before any engine starts.

The served checks (a hybrid Gemma 3, per-layer pages) are in ``test_hybrid_server.py`` and
``test_layer_pages.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_namm.config import EvictionConfig
from vllm_namm.layer_budgets import layer_budget_scales
from vllm_namm.policies import make_policy
from vllm_namm.request_memory import RequestMemory, eviction_step
from vllm_namm.settings import BudgetConfig
from vllm_namm.vllm_patch.model_check import SLIDING, layer_kinds, unsupported_reason


# ---------------------------------------------------------------------------------------------
# budgets per layer
# ---------------------------------------------------------------------------------------------
def test_uniform_layer_budget_is_the_budget_everywhere() -> None:
    assert layer_budget_scales("uniform", 30) == [1.0] * 30
    assert layer_budget_scales("pyramid", 1) == [1.0]


def test_pyramid_is_pyramidkv_and_keeps_the_total() -> None:
    s = layer_budget_scales("pyramid", 30)
    assert s[0] == pytest.approx(2 - 1 / 20) and s[-1] == pytest.approx(1 / 20)
    assert sum(s) == pytest.approx(30)
    assert all(a > b for a, b in zip(s, s[1:], strict=False))  # strictly decreasing
    steps = {round(a - b, 12) for a, b in zip(s, s[1:], strict=False)}
    assert len(steps) == 1  # an arithmetic sequence


def test_budget_scale_multiplies_before_the_cap() -> None:
    tokens, ratio = BudgetConfig(tokens=512), BudgetConfig(ratio=0.25)
    assert tokens.size(4000, 4000, 1.5) == 768
    assert tokens.size(4000, 4000, 0.05) == 26  # ceil(25.6)
    assert tokens.size(600, 600, 1.5) == 600  # never more than is cached
    assert ratio.size(1000, 4000, 0.5) == 500  # of the context so far, as without a scale
    assert ratio.size(1000, 4000, 1.0) == ratio.size(1000, 4000) == 1000


def test_a_memory_keeps_its_share_of_the_page_budget() -> None:
    """One H2O step per memory, same keys: the pages kept follow each memory's budget share."""
    cfg = EvictionConfig(policy="h2o", budget=BudgetConfig(tokens=256), interval=512)
    policy = make_policy(cfg)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 1024, 1, 16, generator=g)
    queries = torch.randn(2, 1024, 2, 16, generator=g)
    kept = {}
    for scale in (0.5, 1.0, 1.5):
        mem = RequestMemory(policy, 2, 32, budget_scale=scale)
        mem.add_queries([q for q in queries], 0)
        eviction_step(mem, cfg, lambda layer, pages: keys[layer], scale=0.25, kv_heads=1)
        kept[scale] = mem.logical_pages - len(mem.evicted_pages)
    assert kept == {0.5: 4, 1.0: 8, 1.5: 12}, kept


def test_layer_budget_needs_per_layer_pages_and_page_selection() -> None:
    with pytest.raises(ValueError, match="needs granularity 'layer'"):
        EvictionConfig(policy="h2o", budget={"ratio": 0.25}, layer_budget="pyramid")
    with pytest.raises(ValueError, match="needs page-level selection"):
        EvictionConfig(
            policy="h2o",
            budget={"ratio": 0.25},
            granularity="layer",
            layer_budget="pyramid",
            selection="token",
        )
    cfg = EvictionConfig(policy="h2o", budget={"ratio": 0.25}, granularity="layer", layer_budget="pyramid")
    assert (cfg.granularity, cfg.layer_budget) == ("layer", "pyramid")
    assert EvictionConfig().granularity == "shared"


# ---------------------------------------------------------------------------------------------
# which groups evict; one group per layer
# ---------------------------------------------------------------------------------------------
def _spec(kind: str, **kw):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    common = dict(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    cls = {"full": FullAttentionSpec, "sliding": SlidingWindowSpec, "mla": MLAAttentionSpec}[kind]
    return cls(**common, **kw)


def test_only_plain_full_attention_groups_evict() -> None:
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    from vllm_namm.vllm_patch.kv_groups import evicted_groups, is_evicted_spec

    assert is_evicted_spec(_spec("full"))
    assert not is_evicted_spec(_spec("sliding", sliding_window=256))
    assert not is_evicted_spec(_spec("full", sliding_window=256))  # a promoted sliding layer
    assert not is_evicted_spec(_spec("mla"))
    groups = [
        KVCacheGroupSpec(["model.layers.0.self_attn.attn"], _spec("sliding", sliding_window=256)),
        KVCacheGroupSpec(["model.layers.5.self_attn.attn"], _spec("full")),
    ]
    assert evicted_groups(KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=groups)) == [1]
    with pytest.raises(RuntimeError, match="no full-attention KV-cache group"):
        evicted_groups(KVCacheConfig(num_blocks=10, kv_cache_tensors=[], kv_cache_groups=groups[:1]))


def test_one_group_per_layer_in_layer_order() -> None:
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    from vllm_namm.vllm_patch.kv_groups import one_group_per_layer

    name = "model.layers.{}.self_attn.attn".format
    sliding, full = _spec("sliding", sliding_window=256), _spec("full")
    groups = [
        KVCacheGroupSpec([name(5), name(11)], full),
        KVCacheGroupSpec([name(0), name(6)], sliding),
        KVCacheGroupSpec([name(1), name(7)], sliding),
    ]
    split = one_group_per_layer(groups)
    assert [g.layer_names for g in split] == [[name(i)] for i in (0, 1, 5, 6, 7, 11)]
    assert [g.kv_cache_spec for g in split] == [sliding, sliding, full, sliding, sliding, full]


# ---------------------------------------------------------------------------------------------
# models refused before any engine starts
# ---------------------------------------------------------------------------------------------
def _model(hf: object, **props) -> SimpleNamespace:
    base = dict(
        is_attention_free=False,
        is_hybrid=False,
        is_encoder_decoder=False,
        use_mla=False,
        uses_alibi=False,
        attention_chunk_size=None,
    )
    return SimpleNamespace(hf_text_config=hf, **(base | props))


def _gemma3(**kw):
    from benchmarks.tiny_model import gemma3_config

    return gemma3_config(**kw)


def test_served_models_pass() -> None:
    from transformers import Qwen2Config

    from benchmarks.tiny_model import llama_config

    assert unsupported_reason(_model(llama_config()), hybrid_manager=True) is None
    assert unsupported_reason(_model(_gemma3()), hybrid_manager=True) is None  # 5 sliding + 1 full
    # a sliding window configured but not used (Qwen2's use_sliding_window=False)
    assert unsupported_reason(_model(Qwen2Config(num_hidden_layers=2)), hybrid_manager=True) is None


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("all_sliding", "every attention layer of mistral has a sliding window (4096 tokens)"),
        ("hybrid_manager_off", "hybrid KV-cache manager is off"),
        ("softcap", "soft-caps its attention logits"),
        ("alibi", "uses ALiBi"),
        ("mla", "multi-head latent attention"),
        ("chunked", "chunked local attention"),
        ("ssm", "state-space layers"),
        ("other_layer_type", "has linear_attention layers"),
        ("attention_free", "no attention layers"),
    ],
)
def test_unsupported_models_have_one_line_reasons(case: str, needle: str) -> None:
    from transformers import Gemma2Config, MistralConfig

    from benchmarks.tiny_model import llama_config

    llama = llama_config()
    models = {
        "all_sliding": (_model(MistralConfig(sliding_window=4096)), True),
        "hybrid_manager_off": (_model(_gemma3()), False),
        "softcap": (_model(Gemma2Config(num_hidden_layers=2)), True),
        "alibi": (_model(llama, uses_alibi=True), True),
        "mla": (_model(llama, use_mla=True), True),
        "chunked": (_model(llama, attention_chunk_size=8192), True),
        "ssm": (_model(llama, is_hybrid=True), True),
        "other_layer_type": (
            _model(
                SimpleNamespace(
                    model_type="x", num_hidden_layers=2, layer_types=["full_attention", "linear_attention"]
                )
            ),
            True,
        ),
        "attention_free": (_model(llama, is_attention_free=True), True),
    }
    model, hybrid = models[case]
    reason = unsupported_reason(model, hybrid_manager=hybrid)
    assert reason is not None and needle in reason, reason
    assert "\n" not in reason


def test_layer_kinds() -> None:
    assert layer_kinds(_gemma3(layers=12)) == {SLIDING: 10, "full_attention": 2}
