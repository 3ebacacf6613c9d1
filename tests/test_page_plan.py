"""Page aggregation: which pages are freed under each rule, protection, realised fractions."""

import pytest
import torch

from vllm_namm.page_plan import PagesByRule, plan_pages

BS = 4


def _keep(n, evict, heads=2):
    k = torch.ones(heads, n, dtype=torch.bool)
    k[:, evict] = False
    return k


def test_all_rule_frees_only_pages_evicted_everywhere():
    pos = torch.arange(20)  # pages 0..4
    l0 = _keep(20, list(range(0, 16)))  # layer 0 wants pages 0-3 gone
    l1 = _keep(20, list(range(4, 12)) + [13])  # layer 1: pages 1, 2 and one token of page 3
    plan = plan_pages(PagesByRule([l0, l1], pos, BS))
    assert plan.free_pages == [1, 2]  # page 0 protected (sink), page 3 kept by layer 1
    assert plan.token_keep.tolist() == [i < 4 or i >= 12 for i in range(20)]
    assert plan.requested == [32, 18] and plan.realised == [16, 16] and plan.forced == [0, 0]
    assert plan.realised_fraction == [0.5, 16 / 18]


def test_per_head_disagreement_keeps_the_page():
    pos = torch.arange(12)
    k = _keep(12, [4, 5, 6, 7])
    k[1, 6] = True
    assert plan_pages(PagesByRule([k], pos, BS)).free_pages == []
    assert plan_pages(PagesByRule([k], pos, BS, rule="majority")).free_pages == [1]
    plan = plan_pages(PagesByRule([k], pos, BS, rule="any"))
    assert plan.free_pages == [1] and plan.forced == [1]


def test_protection_first_last_explicit_and_unscored():
    pos = torch.arange(24)
    evict_all = [torch.zeros(2, 24, dtype=torch.bool)]
    assert plan_pages(PagesByRule(evict_all, pos, BS)).free_pages == [1, 2, 3, 4]  # not 0, not 5 (newest)
    assert plan_pages(PagesByRule(evict_all, pos, BS, protect_first_page=False)).free_pages == [0, 1, 2, 3, 4]
    assert plan_pages(PagesByRule(evict_all, pos, BS, protected_pages=[2])).free_pages == [1, 3, 4]
    assert plan_pages(PagesByRule(evict_all, pos, BS, protect_from_position=13)).free_pages == [1, 2]


def test_holes_and_partial_pages():
    pos = torch.tensor([0, 1, 2, 3, 9, 10, 14, 15, 16, 17, 18, 30])  # page 1 already freed, page 2 partial
    keep = torch.ones(12, dtype=torch.bool)
    keep[[4, 5, 6, 7]] = False
    plan = plan_pages(PagesByRule([keep], pos, BS))
    assert plan.free_pages == [2, 3]
    assert plan.token_keep.sum() == 8


def test_errors():
    with pytest.raises(ValueError, match="covers 3 tokens"):
        plan_pages(PagesByRule([torch.ones(3, dtype=torch.bool)], torch.arange(4), BS))
    with pytest.raises(ValueError, match="unknown page rule"):
        plan_pages(PagesByRule([torch.ones(8, dtype=torch.bool)], torch.arange(8), BS, rule="some"))


# ---- page-level selection (budget policies) ---------------------------------------------------

from vllm_namm.page_plan import PagesByBudget, budget_pages, select_pages, token_ranks  # noqa: E402

AGGREGATES = ("mean", "max", "vote")


def _scores(n, layers=3, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(heads, n, generator=g) for _ in range(layers)]


def _kept_pages(plan, pos, bs=BS):
    return sorted(set((pos[plan.token_keep] // bs).tolist()))


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("n, keep", [(83, 30), (83, 1), (64, 17), (7, 5), (200, 100)])
def test_select_pages_budget_holds_with_partial_last_page(aggregate, n, keep):
    pos = torch.arange(n)  # n % BS != 0 for most: the last page is partial
    plan = select_pages(PagesByBudget(_scores(n, seed=n), pos, BS, keep, aggregate))
    n_pages = -(-n // BS)
    kept = _kept_pages(plan, pos)
    assert 0 in kept and n_pages - 1 in kept  # the sink page and the page being written
    assert len(kept) == min(n_pages, max(budget_pages(keep, BS), 2))
    assert sorted(plan.free_pages + kept) == list(range(n_pages))
    assert plan.token_keep.tolist() == [p not in plan.free_pages for p in (pos // BS).tolist()]


def test_select_pages_protections():
    n = 40  # pages 0..9
    pos = torch.arange(n)
    low = [torch.zeros(2, n)]  # every page equally worthless: only protections and ties decide
    plan = select_pages(PagesByBudget(low, pos, BS, keep_tokens=0))
    assert _kept_pages(plan, pos) == [0, 9]
    assert _kept_pages(select_pages(PagesByBudget(low, pos, BS, 0, protect_first_page=False)), pos) == [9]
    assert _kept_pages(select_pages(PagesByBudget(low, pos, BS, 0, protect_from_position=29)), pos) == [
        0,
        7,
        8,
        9,
    ]
    assert _kept_pages(select_pages(PagesByBudget(low, pos, BS, 0, protected_pages=[4])), pos) == [0, 4, 9]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[13] = True  # a protected (sink/recent) token keeps its page
    assert _kept_pages(select_pages(PagesByBudget(low, pos, BS, 0, protected_token_mask=mask)), pos) == [
        0,
        3,
        9,
    ]
    # protected pages count inside the budget: 4 pages of budget = 2 protected + 2 best
    s = torch.arange(n, dtype=torch.float).flip(0).expand(2, -1)  # older = better
    assert _kept_pages(select_pages(PagesByBudget([s], pos, BS, 4 * BS)), pos) == [0, 1, 2, 9]
    # ties go to the newer page
    assert _kept_pages(select_pages(PagesByBudget(low, pos, BS, 4 * BS)), pos) == [0, 7, 8, 9]
    # a budget larger than the cache frees nothing
    assert select_pages(PagesByBudget(_scores(n), pos, BS, 10 * n)).free_pages == []


def test_select_pages_aggregation_rules_differ():
    """One budget slot (pages 0 and the newest are protected), three rules, three choices."""
    n = 24  # pages 0..5
    pos = torch.arange(n)
    s = torch.full((2, n), 0.1)
    s[:, 12:16] = 0.6  # page 3: every entry moderately high
    s[:, 9] = 1.0  # page 2: one token is every head's favourite, the rest is low
    assert _kept_pages(select_pages(PagesByBudget([s, s.clone()], pos, BS, 3 * BS, "max")), pos) == [0, 2, 5]
    assert _kept_pages(select_pages(PagesByBudget([s, s.clone()], pos, BS, 3 * BS, "mean")), pos) == [0, 3, 5]
    # vote: page 4 has half its entries inside every head's token budget (the 10 best), page 3 none
    n = 40  # pages 0..9
    pos = torch.arange(n)
    s = torch.full((2, n), 0.1)
    s[:, :4] = s[:, 36:] = 1.0  # the protected pages take 8 of the 10 per-head slots
    s[:, 12:16] = 0.6  # page 3: moderately high everywhere, just outside the token budget
    s[:, 16:18] = 0.9  # page 4: half at the top ...
    s[:, 18:20] = 0.0  # ... half at the bottom
    assert _kept_pages(select_pages(PagesByBudget([s], pos, BS, 10, "mean")), pos) == [0, 3, 9]
    assert _kept_pages(select_pages(PagesByBudget([s], pos, BS, 10, "vote")), pos) == [0, 4, 9]


def test_select_pages_is_scale_free_per_head_and_layer():
    n = 50
    pos = torch.arange(n)
    scores = _scores(n, seed=4)
    scaled = [scores[0] * 1e4, scores[1] - 7.0, scores[2] * 1e-3]
    for agg in AGGREGATES:
        assert (
            select_pages(PagesByBudget(scores, pos, BS, 20, agg)).free_pages
            == select_pages(PagesByBudget(scaled, pos, BS, 20, agg)).free_pages
        )


def test_select_pages_agrees_with_token_selection_when_heads_agree():
    """Identical, page-aligned decisions everywhere: page selection = token selection + rule 'all'."""
    n = 32
    pos = torch.arange(n)
    s = torch.zeros(n)
    s[[4, 5, 6, 7, 20, 21, 22, 23]] = 1.0  # pages 1 and 5 are the best
    layers = [s.expand(2, -1).clone() for _ in range(3)]
    keep = [x > 0.5 for x in layers]
    for m in keep:
        m[:, :4] = True  # page 0 and the newest page are protected at token level too
        m[:, 28:] = True
    token = plan_pages(PagesByRule(keep, pos, BS))
    for agg in AGGREGATES:
        page = select_pages(PagesByBudget(layers, pos, BS, 16, agg, keep_masks=keep))
        assert page.free_pages == token.free_pages == [2, 3, 4, 6]
        assert page.realised == page.requested and page.forced == [0, 0, 0]


def test_select_pages_holes_stats_and_nan():
    pos = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])  # page 1 already freed
    s = torch.tensor([[0.0, 0, 0, 0, 5, 5, 5, 5, 1, 1, 1, 1, 0, 0]])
    plan = select_pages(
        PagesByBudget([s], pos, BS, keep_tokens=8)
    )  # 2 pages: page 0 and page 4 (newest) protected
    assert plan.free_pages == [2, 3]
    assert plan.requested == plan.realised == [8]  # no token-level masks: what was freed
    s[0, 9] = float("nan")  # a broken score keeps its token (position 13): its page ranks first
    assert select_pages(PagesByBudget([s], pos, BS, keep_tokens=12, aggregate="max")).free_pages == [2]
    keep = torch.ones(1, 14, dtype=torch.bool)
    keep[0, 4:6] = False
    stats = select_pages(PagesByBudget([s], pos, BS, 8, keep_masks=[keep]))
    assert stats.requested == [2] and stats.realised == [2] and stats.forced == [6]
    assert token_ranks(torch.tensor([[3.0, 1.0, 3.0, float("nan")]])).tolist() == [[1, 0, 2, 3]]


def test_select_pages_errors():
    with pytest.raises(ValueError, match="cover 3 tokens"):
        select_pages(PagesByBudget([torch.ones(3)], torch.arange(4), BS, 2))
    with pytest.raises(ValueError, match="unknown page score"):
        select_pages(PagesByBudget([torch.ones(4)], torch.arange(4), BS, 2, aggregate="median"))
    with pytest.raises(ValueError, match="keep_tokens"):
        select_pages(PagesByBudget([torch.ones(4)], torch.arange(4), BS, -1))
    with pytest.raises(ValueError, match="empty"):
        select_pages(PagesByBudget([], torch.arange(4), BS, 2))
    empty = select_pages(PagesByBudget([torch.ones(2, 0)], torch.arange(0), BS, 2))
    assert empty.free_pages == [] and empty.token_keep.numel() == 0
