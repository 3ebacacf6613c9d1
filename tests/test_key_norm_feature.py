"""The optional key-norm feature and the page-level (multiple-instance) offline fit."""

import pytest
import torch

from evolve.fit import build_weights, fit_linear, page_labels, page_logits
from vllm_namm.config import FeatureConfig
from vllm_namm.features import token_features
from vllm_namm.policies import NammPolicy
from vllm_namm.policies.base import LayerView
from vllm_namm.weights import NammWeights, WeightsError, describe, load_weights, save_weights

torch.manual_seed(0)


def test_key_norm_follows_the_bins_and_is_normalised_with_them():
    cfg = FeatureConfig(key_norm=True)
    assert cfg.input_dim == 8 + 17 + 1
    ema, norms = torch.rand(2, 5, 17), torch.rand(2, 5) * 10
    mean, std = torch.rand(18), torch.rand(18) + 0.5
    x = token_features(ema, torch.arange(5).expand(2, -1), 4, cfg, mean, std, norms)
    assert x.shape == (2, 5, 26)
    torch.testing.assert_close(x[..., 8:25], (ema - mean[:17]) / std[:17])
    torch.testing.assert_close(x[..., 25], (norms - mean[17]) / std[17])
    with pytest.raises(ValueError, match="key norm"):
        token_features(ema, torch.arange(5).expand(2, -1), 4, cfg, mean, std)


def test_weights_with_key_norm_roundtrip_and_shape_check(tmp_path):
    w = NammWeights.zeros(features=FeatureConfig(key_norm=True))
    assert w.scorer.input_dim == 26 and w.norm_mean.shape == (18,)
    path = tmp_path / "kn.safetensors"
    save_weights(path, w)
    back = load_weights(path)
    assert back.features.key_norm and "key L2 norm" in describe(back)
    w.norm_std = torch.ones(17)
    with pytest.raises(WeightsError, match="norm_std"):
        save_weights(tmp_path / "bad.safetensors", w)


def _view(n: int = 40, kv: int = 2, keys: bool = True) -> LayerView:
    attn = torch.softmax(torch.randn(kv, 32, n), dim=-1)
    return LayerView(
        attn=attn,
        keys=torch.randn(kv, n, 16) if keys else None,
        positions=torch.arange(n).expand(kv, -1),
        query_positions=torch.arange(n - 32, n),
        num_new_tokens=n,
    )


@pytest.mark.parametrize("kind", ["mlp", "bam"])
def test_fitted_weights_score_exactly_the_linear_function(kind: str):
    """evolve.fit's claim: hidden layers zero, so the scorer computes w . x + b (key norm included)."""
    w, b = torch.randn(26), 0.3
    weights = build_weights(kind, None, 0.999, torch.rand(18), torch.rand(18) + 0.5, w, b, {}, key_norm=True)
    policy = NammPolicy(weights)
    assert policy.needs_keys
    view = _view()
    x, _ = policy.features_for(view, policy.new_state())
    scores = policy.score(view, policy.new_state())
    torch.testing.assert_close(scores, x @ w + b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keys"):
        policy.score(_view(keys=False), policy.new_state())


def test_page_logits_is_a_grouped_logsumexp():
    logits = torch.randn(10, dtype=torch.float64)
    page = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    ref = torch.stack([logits[page == p].logsumexp(0) for p in range(4)])
    torch.testing.assert_close(page_logits(logits, page), ref)
    assert page_labels(torch.tensor([0.0, 0, 0, 1, 0, 0, 0, 0, 0, 1]), page).tolist() == [0, 1, 0, 1]


def test_page_fit_finds_the_marker_token_a_token_fit_misses():
    """A positive page holds one marker token (feature 0 high); its other tokens look like filler.

    Per token, feature 1 (a weak, sentence-wide signal) is the better predictor; per page, the
    marker decides. The page target must weight the marker, the token target need not.
    """
    g = torch.Generator().manual_seed(1)
    pages, per = 400, 8
    page = torch.arange(pages).repeat_interleave(per)
    pos_page = torch.rand(pages, generator=g) < 0.5
    y = pos_page[page].float()
    x = torch.randn(pages * per, 2, generator=g)
    x[:, 1] += 0.5 * y  # weak, on every token of a positive page
    marker = torch.arange(pages) * per  # first token of each page
    x[marker[pos_page], 0] += 6.0
    w_tok, _ = fit_linear(x, y)
    w_page, b_page = fit_linear(x, y, page=page)
    assert w_page[0] > 2 * abs(float(w_tok[0])) and w_page[0] > w_page[1]
    acc = ((page_logits(x.double() @ w_page.double() + b_page, page) > 0) == pos_page).float().mean()
    assert acc > 0.9


def test_shipped_key_norm_weights_by_name():
    """``--namm-weights evolved-kn``: the evolved scorer that reads the key norm, ranked under 0.3."""
    from vllm_namm.config import EvictionConfig
    from vllm_namm.policies import make_policy

    policy = make_policy(EvictionConfig(policy="namm", weights="evolved-kn"))
    assert policy.needs_keys and policy.num_params == 1431
    assert policy.budget is not None and policy.budget.ratio == 0.3
    assert policy.weights.provenance is not None and policy.weights.provenance.generations == 8
