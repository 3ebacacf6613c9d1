"""BAM / MLP scorers: parameter counts, flat vectors, the counter-causal mask."""

import pytest
import torch

from vllm_namm.scorers import BAMScorer, MLPScorer, ScorerConfig, make_scorer


def _random(scorer, seed=0):
    g = torch.Generator().manual_seed(seed)
    scorer.from_flat(0.3 * torch.randn(scorer.num_params, generator=g))
    return scorer


def test_param_counts():
    assert BAMScorer(25, 32).num_params == 4172  # 25*96+96 + 32*50+50 + 25+1
    assert BAMScorer(25, 16).num_params == 2124
    assert MLPScorer(25, 25, 2).num_params == 1326
    assert make_scorer(ScorerConfig()).num_params == 4172
    assert make_scorer(ScorerConfig(kind="mlp")).hidden == 25
    n = sum(p.numel() for p in BAMScorer().parameters())
    assert n == 4172


def test_flat_round_trip_and_length_check():
    for s in (BAMScorer(), MLPScorer()):
        s = _random(s)
        flat = s.to_flat()
        assert flat.shape == (s.num_params,)
        fresh = make_scorer(ScorerConfig(kind="bam" if isinstance(s, BAMScorer) else "mlp"))
        fresh.from_flat(flat)
        assert torch.equal(fresh.to_flat(), flat)
        x = torch.randn(2, 9, 25)
        torch.testing.assert_close(fresh(x), s(x))
        with pytest.raises(ValueError, match=f"{s.num_params} parameters"):
            s.from_flat(torch.zeros(s.num_params + 1))


def test_zero_init_scores_zero():
    for s in (BAMScorer(), MLPScorer()):
        assert torch.equal(s(torch.randn(3, 11, 25)), torch.zeros(3, 11))


def test_bam_counter_causal_mask():
    s = _random(BAMScorer())
    x = torch.randn(1, 10, 25)
    base = s(x)
    newer = x.clone()
    newer[0, 7] += 1.0  # a newer token changes: every older token's score may move
    out = s(newer)
    assert (out[0, :7] - base[0, :7]).abs().min() > 0
    assert torch.equal(out[0, 8:], base[0, 8:])
    older = x.clone()
    older[0, 2] += 1.0  # an older token changes: no newer token's score moves
    out = s(older)
    assert torch.equal(out[0, 3:], base[0, 3:])
    assert out[0, 2] != base[0, 2]


def test_batched_candidates_and_padding():
    s = BAMScorer()
    flats = 0.3 * torch.randn(2, s.num_params)
    x = torch.randn(2, 6, 25)
    out = s(x, flats)
    for b in range(2):
        torch.testing.assert_close(out[b], s(x[b : b + 1], flats[b])[0])
    padded = torch.cat([x, torch.randn(2, 3, 25)], dim=1)
    valid = torch.arange(9).expand(2, -1) < 6
    torch.testing.assert_close(s(padded, flats, valid)[:, :6], out)


def test_mlp_is_per_token():
    s = _random(MLPScorer())
    x = torch.randn(1, 5, 25)
    y = x.clone()
    y[0, 0] += 1
    assert torch.equal(s(x)[0, 1:], s(y)[0, 1:])
