"""Page aggregation: which pages are freed under each rule, protection, realised fractions."""

import pytest
import torch

from vllm_namm.paging import plan_pages

BS = 4


def _keep(n, evict, heads=2):
    k = torch.ones(heads, n, dtype=torch.bool)
    k[:, evict] = False
    return k


def test_all_rule_frees_only_pages_evicted_everywhere():
    pos = torch.arange(20)  # pages 0..4
    l0 = _keep(20, list(range(0, 16)))  # layer 0 wants pages 0-3 gone
    l1 = _keep(20, list(range(4, 12)) + [13])  # layer 1: pages 1, 2 and one token of page 3
    plan = plan_pages([l0, l1], pos, BS)
    assert plan.free_pages == [1, 2]  # page 0 protected (sink), page 3 kept by layer 1
    assert plan.token_keep.tolist() == [i < 4 or i >= 12 for i in range(20)]
    assert plan.requested == [32, 18] and plan.realised == [16, 16] and plan.forced == [0, 0]
    assert plan.realised_fraction == [0.5, 16 / 18]


def test_per_head_disagreement_keeps_the_page():
    pos = torch.arange(12)
    k = _keep(12, [4, 5, 6, 7])
    k[1, 6] = True
    assert plan_pages([k], pos, BS).free_pages == []
    assert plan_pages([k], pos, BS, rule="majority").free_pages == [1]
    plan = plan_pages([k], pos, BS, rule="any")
    assert plan.free_pages == [1] and plan.forced == [1]


def test_protection_first_last_explicit_and_unscored():
    pos = torch.arange(24)
    evict_all = [torch.zeros(2, 24, dtype=torch.bool)]
    assert plan_pages(evict_all, pos, BS).free_pages == [1, 2, 3, 4]  # not 0, not 5 (newest)
    assert plan_pages(evict_all, pos, BS, protect_first_page=False).free_pages == [0, 1, 2, 3, 4]
    assert plan_pages(evict_all, pos, BS, protected_pages=[2]).free_pages == [1, 3, 4]
    assert plan_pages(evict_all, pos, BS, protect_from_position=13).free_pages == [1, 2]


def test_holes_and_partial_pages():
    pos = torch.tensor([0, 1, 2, 3, 9, 10, 14, 15, 16, 17, 18, 30])  # page 1 already freed, page 2 partial
    keep = torch.ones(12, dtype=torch.bool)
    keep[[4, 5, 6, 7]] = False
    plan = plan_pages([keep], pos, BS)
    assert plan.free_pages == [2, 3]
    assert plan.token_keep.sum() == 8


def test_errors():
    with pytest.raises(ValueError, match="covers 3 tokens"):
        plan_pages([torch.ones(3, dtype=torch.bool)], torch.arange(4), BS)
    with pytest.raises(ValueError, match="unknown page rule"):
        plan_pages([torch.ones(8, dtype=torch.bool)], torch.arange(8), BS, rule="some")
