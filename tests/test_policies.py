"""Policies: NAMM's threshold rule, exact budgets, protection, NaN safety, the default weights."""

import pytest
import torch
from pydantic import ValidationError

from vllm_namm.config import BudgetConfig, EvictionConfig, FeatureConfig, ProtectConfig
from vllm_namm.policies import (
    POLICIES,
    LayerView,
    NammPolicy,
    equalize_head_drops,
    make_policy,
    protect,
    protected_mask,
)
from vllm_namm.policies.registry import POLICY_NAMES, REGISTRY, budget_policies, policy_class
from vllm_namm.weights import NammWeights

KV, N, NQ = 2, 96, 32


def _view(attn=None, n=N, n_q=NQ, keys=True, num_new=None):
    if attn is None:
        logits = torch.randn(KV, n_q, n)
        qpos = torch.arange(n - n_q, n)
        logits = logits.masked_fill(torch.arange(n).view(1, 1, -1) > qpos.view(1, -1, 1), float("-inf"))
        attn = torch.softmax(logits, -1)
    return LayerView(
        attn=attn,
        keys=torch.randn(KV, n, 8) if keys else None,
        positions=torch.arange(n).expand(KV, -1).clone(),
        query_positions=torch.arange(n - n_q, n),
        num_new_tokens=n if num_new is None else num_new,
    )


def _namm(seed=0, threshold=None):
    w = NammWeights.zeros(features=FeatureConfig(n_up=NQ))
    w.params = 0.3 * torch.randn(w.params.numel(), generator=torch.Generator().manual_seed(seed))
    return NammPolicy(w, threshold=threshold)


def test_registry_and_factory():
    assert list(POLICIES) == list(POLICY_NAMES) == list(REGISTRY) and {"none", "namm"} < set(POLICIES)
    assert all(POLICIES[n].name == n for n in POLICY_NAMES)
    assert make_policy(EvictionConfig()).name == "none"
    default = make_policy(
        EvictionConfig(policy="namm")
    )  # the shipped evolved weights, ranked under their budget
    assert default.num_params == 1431 and default.needs_keys  # the attention features + the key norm
    assert default.budget is not None and default.budget.ratio == 0.3
    assert make_policy(EvictionConfig(policy="namm", weights="evolved-attn")).num_params == 1326
    assert make_policy(EvictionConfig(policy="namm", weights="hand")).num_params == 4172  # the hand-set BAM
    assert len(budget_policies()) >= 4
    for name in budget_policies():
        assert make_policy(EvictionConfig(policy=name, budget=BudgetConfig(tokens=10))).name == name
    with pytest.raises(ValueError, match="unknown eviction policy 'bogus'"):
        policy_class("bogus")


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_registered_policy_is_one_config_away(name):
    """The config, the flags and the factory all accept each registered policy by its name alone."""
    from vllm_namm.vllm_patch.cli import FLAGS

    assert name in FLAGS["--kv-eviction"][1]["choices"]
    rule = policy_class(name).budget_rule
    budget = BudgetConfig(ratio=0.5) if rule == "required" else None
    pol = make_policy(EvictionConfig(policy=name, budget=budget))
    assert type(pol) is POLICIES[name]
    view = _view()
    keep = pol.select(pol.score(view, pol.new_state()), view)
    assert keep.shape == (KV, N) and keep.dtype == torch.bool
    if rule == "none":
        with pytest.raises(ValidationError, match="takes no budget"):
            EvictionConfig(policy=name, budget=BudgetConfig(ratio=0.5))


def test_config_validation_messages():
    with pytest.raises(ValidationError, match="needs a budget"):
        EvictionConfig(policy="h2o")
    with pytest.raises(ValidationError, match="multiple of 16"):
        EvictionConfig(interval=100)
    with pytest.raises(ValidationError, match="exactly one of"):
        BudgetConfig(tokens=10, ratio=0.5)
    with pytest.raises(ValidationError, match="extra"):
        EvictionConfig(polcy="namm")
    with pytest.raises(ValidationError, match="only apply to policy 'namm'"):
        EvictionConfig(threshold=0.1)
    assert FeatureConfig().gamma == pytest.approx(0.99**16) and FeatureConfig().bins == 17


def test_namm_evicts_exactly_negative_scores_minus_protected():
    pol = _namm()
    view = _view()
    scores = pol.score(view, pol.new_state())
    assert scores.shape == (KV, N) and (scores < 0).any() and (scores >= 0).any()
    cfg = ProtectConfig(sink_tokens=2, recent_tokens=3)
    keep = protect(pol.select(scores, view), view, cfg)
    expected = (scores >= 0) | protected_mask(view, cfg)
    assert torch.equal(keep, expected)
    assert protected_mask(view, cfg)[:, [0, 1, N - 3, N - 2, N - 1]].all()
    assert protected_mask(view, cfg).sum() == KV * 5
    # threshold shift
    keep2 = _namm(threshold=0.5).select(scores, view)
    assert torch.equal(keep2, scores >= 0.5)


def test_namm_zero_params_keep_everything_and_per_request_override():
    pol = _namm()
    view = _view()
    zero = pol.new_state(params=torch.zeros(pol.num_params))
    assert pol.select(pol.score(view, zero), view).all()
    with pytest.raises(ValueError, match="needs 4172"):
        pol.new_state(params=torch.zeros(5))


@pytest.mark.parametrize("name", budget_policies())
@pytest.mark.parametrize("budget", [BudgetConfig(tokens=40), BudgetConfig(ratio=0.25)])
def test_budget_policies_keep_exactly_their_budget(name, budget):
    cfg = EvictionConfig(policy=name, budget=budget, protect=ProtectConfig(sink_tokens=1, recent_tokens=4))
    pol = make_policy(cfg)
    view = _view()
    keep = protect(pol.select(pol.score(view, pol.new_state()), view), view, cfg.protect)
    assert keep.sum(dim=-1).tolist() == [budget.size(N)] * KV
    assert keep[:, 0].all() and keep[:, -4:].all()


def test_streaming_keeps_sinks_and_recent_window():
    pol = make_policy(EvictionConfig(policy="streaming", budget=BudgetConfig(tokens=20), streaming_sinks=4))
    view = _view(attn=None)
    keep = pol.select(pol.score(view, pol.new_state()), view)
    expected = torch.zeros(N, dtype=torch.bool)
    expected[:4] = True
    expected[-16:] = True
    assert torch.equal(keep, expected.expand(KV, -1))


def test_h2o_accumulates_and_filters():
    pol = make_policy(EvictionConfig(policy="h2o", budget=BudgetConfig(tokens=8)))
    state = pol.new_state()
    attn = torch.zeros(KV, 4, 10)
    attn[:, :, 3] = 1.0
    view = LayerView(attn, None, torch.arange(10).expand(KV, -1), torch.arange(6, 10), 10)
    s1 = pol.score(view, state)
    assert s1[0, 3] == 4 and s1[0, 0] == 0
    keep = torch.ones(10, dtype=torch.bool)
    keep[0] = False
    state.filter(keep)
    view2 = LayerView(
        torch.zeros(KV, 2, 11), None, torch.arange(1, 12).expand(KV, -1), torch.arange(10, 12), 2
    )
    s2 = pol.score(view2, state)
    assert s2.shape == (KV, 11) and s2[0, 2] == 4


def test_snapkv_window_and_pooling():
    pol = make_policy(EvictionConfig(policy="snapkv", budget=BudgetConfig(tokens=40), snapkv_window=8))
    attn = torch.zeros(KV, NQ, N)
    attn[:, -8:, 10] = 1.0
    view = _view(attn=attn)
    s = pol.score(view, pol.new_state())
    assert (s[:, -8:] == torch.finfo(torch.float32).max).all()  # observation window itself
    assert (s[:, 7:14] == 8).all() and s[0, 20] == 0  # max-pool kernel 7 spreads the vote +-3


def test_nan_attention_never_evicts_everything():
    attn = torch.full((KV, NQ, N), float("nan"))
    for name in ("namm", "h2o", "snapkv"):
        budget = None if name == "namm" else BudgetConfig(tokens=30)
        cfg = EvictionConfig(policy=name, budget=budget, weights="hand" if name == "namm" else None)
        pol = make_policy(cfg)
        view = _view(attn=attn)
        keep = protect(pol.select(pol.score(view, pol.new_state()), view), view, cfg.protect)
        assert keep.sum(dim=-1).min() >= (N if name == "namm" else 30)
    scores = torch.full((KV, N), float("nan"))
    assert _namm().select(scores, _view()).all()
    scores[:, :10] = -1.0
    assert equalize_head_drops(_namm().select(scores, _view()), scores).sum(-1).tolist() == [N - 10] * KV


def test_equalize_head_drops_same_count_lowest_first():
    scores = torch.tensor([[-3.0, -1.0, 2.0, -2.0, 1.0], [1.0, -5.0, 2.0, 3.0, 4.0]])
    keep = scores >= 0
    out = equalize_head_drops(keep, scores)
    assert out.tolist() == [[False, True, True, True, True], [True, False, True, True, True]]
    assert torch.equal(
        equalize_head_drops(torch.ones(2, 5, dtype=torch.bool), scores), torch.ones(2, 5, dtype=torch.bool)
    )


def test_initial_weights_keep_attended_and_evict_ignored_tokens():
    """Shipped hand-set weights: tokens with negligible attention go, attended ones stay."""
    pol = make_policy(EvictionConfig(policy="namm", interval=512, weights="hand"))
    n_old, n_q = 512, 512
    n = n_old + n_q
    attn = torch.zeros(KV, n_q, n)
    hot = torch.arange(0, n_old, 4)  # a quarter of the old tokens share most attention
    attn[:, :, hot] = 0.9 / hot.numel()
    cold = torch.tensor([t for t in range(n_old) if t % 4])
    attn[:, :, cold] = 1e-7
    for i in range(n_q):  # the rest of each query's mass on the new tokens it can see
        attn[:, i, n_old : n_old + i + 1] = 0.1 / (i + 1)
    state = pol.new_state()
    # first step: the old tokens were cached and scored once before (warm state)
    warm = torch.zeros(KV, n_q, n_old)
    warm[:, :, hot] = 0.9 / hot.numel()
    warm[:, :, cold] = 1e-7
    warm = warm.masked_fill(torch.arange(n_old).view(1, 1, -1) > torch.arange(n_q).view(1, -1, 1), 0.0)
    v0 = LayerView(warm, None, torch.arange(n_old).expand(KV, -1), torch.arange(n_q), n_old)
    pol.score(v0, state)
    v1 = LayerView(attn, None, torch.arange(n).expand(KV, -1), torch.arange(n_old, n), n_q)
    keep = pol.select(pol.score(v1, state), v1)
    assert keep[:, hot].all()
    assert not keep[:, cold].any()
