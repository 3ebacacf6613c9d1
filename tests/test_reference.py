"""Reference runner on a tiny random Llama: exactness with `none`, budgets, NAMM per-head rule."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vllm_namm.config import BudgetConfig, EvictionConfig, FeatureConfig, ProtectConfig  # noqa: E402
from vllm_namm.policies import POLICIES, NammPolicy, make_policy  # noqa: E402
from vllm_namm.policies.budget import BudgetPolicy  # noqa: E402
from vllm_namm.reference import generate  # noqa: E402
from vllm_namm.weights import NammWeights  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        max_position_embeddings=4096,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _prompt(n, seed=1):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_none_is_token_identical_to_generate(model):
    prompt = _prompt(40)
    ref = model.generate(
        prompt.view(1, -1),
        attention_mask=torch.ones(1, 40, dtype=torch.long),
        do_sample=False,
        max_new_tokens=24,
    )[0, 40:].tolist()
    cfg = EvictionConfig(interval=16)  # 16-token chunks: exercises chunking and decode buffering
    out = generate(model, None, prompt, make_policy(cfg), 24, cfg)
    assert out.tokens == ref
    assert out.cache_lengths == [40 + len(ref) - 1] * 2
    assert len(out.steps) == (40 + len(ref) - 1) // 16


def test_streaming_budget_after_2k_prompt(model):
    cfg = EvictionConfig(policy="streaming", budget=BudgetConfig(tokens=300), selection="token")
    out = generate(model, None, _prompt(2048), make_policy(cfg), 3, cfg)
    assert out.prompt_cache_lengths == [300, 300]
    assert [s.seq_len for s in out.steps] == [512, 1024, 1536, 2048]
    assert out.cache_lengths == [302, 302]  # 2 decode tokens buffered, no boundary reached


def test_streaming_budget_in_pages(model):
    """Page-level selection (the default): 300 tokens buy ceil(300 / 16) = 19 whole pages,
    the first page and the newest 18 (the page being written among them)."""
    cfg = EvictionConfig(policy="streaming", budget=BudgetConfig(tokens=300))
    assert cfg.selection == "page"
    out = generate(model, None, _prompt(2048), make_policy(cfg), 3, cfg, page_size=16)
    assert out.prompt_cache_lengths == [19 * 16, 19 * 16]
    assert [s.seq_len for s in out.steps] == [512, 1024, 1536, 2048]
    assert out.cache_lengths == [19 * 16 + 2] * 2


def test_namm_per_head_equal_drops_and_logical_positions(model):
    w = NammWeights.zeros(features=FeatureConfig(n_up=32))
    w.params = 0.5 * torch.randn(w.params.numel(), generator=torch.Generator().manual_seed(3))
    pol = NammPolicy(w)
    cfg = EvictionConfig(policy="namm", interval=32, protect=ProtectConfig(sink_tokens=4))
    out = generate(model, None, _prompt(200), pol, 30, cfg)  # last step: prompt tail + decode buffered
    assert len(out.tokens) == 30
    assert [s.seq_len for s in out.steps] == [32, 64, 96, 128, 160, 192, 224]
    assert out.evicted > 0
    for s in out.steps:
        assert all(a <= b for a, b in zip(s.after, s.before, strict=True))
    assert all(4 < n < 200 + 30 for n in out.cache_lengths)


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("policy", sorted(n for n, c in POLICIES.items() if issubclass(c, BudgetPolicy)))
def test_page_selection_keeps_whole_pages_shared_by_every_layer_and_head(model, policy, page_size):
    """The engine's page rule in the reference runner: after the last step (at 512 of a 600-token
    prompt) every layer and head hold the same whole pages, ceil(25 % x 512 / page) of them."""
    cfg = EvictionConfig(policy=policy, interval=128, budget=BudgetConfig(ratio=0.25))
    out = generate(model, None, _prompt(600, seed=7), make_policy(cfg), 4, cfg, page_size=page_size)
    assert [s.seq_len for s in out.steps] == [128, 256, 384, 512]
    assert out.prompt_cache_lengths == [128 + 88] * 2  # 8 x 16 or 4 x 32 tokens + the unscored tail
    pos = out.cache_positions[0][0]
    for layer in out.cache_positions:
        assert torch.equal(layer, pos.expand_as(layer))  # one token set for all layers and heads
    scored = pos[pos < 512]
    pages = torch.unique(scored // page_size)
    assert scored.numel() == pages.numel() * page_size  # whole pages only
    assert 0 in pages.tolist() and 511 // page_size in pages.tolist()  # sink page, newest scored page
    assert torch.equal(pos[pos >= 512], torch.arange(512, 600 + 3))


@pytest.mark.parametrize("selection", ["page", "token"])
def test_namm_under_a_budget_selects_as_the_engine(model, selection):
    """NAMM ranked under a budget keeps whole pages shared by every layer and head (the engine's
    rule) under page selection, and each KV head its own tokens under token selection."""
    w = NammWeights.zeros(features=FeatureConfig(n_up=128, key_norm=True))  # heads' keys differ
    w.params = 0.5 * torch.randn(w.params.numel(), generator=torch.Generator().manual_seed(5))
    cfg = EvictionConfig(policy="namm", interval=128, budget=BudgetConfig(ratio=0.25), selection=selection)
    pol = NammPolicy(w, budget=cfg.budget)
    out = generate(model, None, _prompt(600, seed=7), pol, 4, cfg, page_size=32)
    scored = [layer[:, layer[0] < 512] for layer in out.cache_positions]
    if selection == "page":
        pos = scored[0][0]
        assert all(torch.equal(layer, pos.expand_as(layer)) for layer in scored)
        assert pos.numel() == torch.unique(pos // 32).numel() * 32 == 4 * 32  # ceil(0.25 x 512 / 32) pages
    else:
        assert all(layer.shape[1] == 128 for layer in scored)  # 0.25 x 512 tokens in every head
        assert any(not torch.equal(layer[0], layer[h]) for layer in scored for h in range(1, layer.shape[0]))
