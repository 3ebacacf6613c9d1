"""Budgets are met in pages (issue 17), without a server: the paged engine's eviction step.

Every budget policy (derived from the registry, not listed by hand) under page-level selection
holds at most ceil(budget / block size) pages plus the protected ones after each step, with
prompts that are not a whole number of pages and after a prefix-cache hit (tokens no policy
has seen, block-aligned, then chunks that start off the interval grid).
"""

from __future__ import annotations

import pytest
import torch

from vllm_namm.config import BudgetConfig, EvictionConfig
from vllm_namm.page_plan import budget_pages
from vllm_namm.policies import POLICIES, make_policy
from vllm_namm.policies.budget import BudgetPolicy
from vllm_namm.policies.registry import budget_policies, budget_takers
from vllm_namm.request_memory import RequestMemory, eviction_step

BS = 32
KV, H, D, LAYERS = 2, 4, 32, 2
BUDGET_POLICY_NAMES = sorted(name for name, cls in POLICIES.items() if issubclass(cls, BudgetPolicy))


RANKED_UNDER_BUDGET = budget_takers()  # the budget policies, and namm ranked under a budget


def test_budget_policy_list_matches_the_config():
    assert set(BUDGET_POLICY_NAMES) == set(budget_policies()) and len(BUDGET_POLICY_NAMES) >= 4
    assert set(budget_policies()) < set(budget_takers())


def _keys_reader(keys: torch.Tensor):
    def read(layer: int, pages: list[int]) -> torch.Tensor:
        idx = torch.cat([torch.arange(p * BS, (p + 1) * BS) for p in pages])
        return keys[layer][idx.clamp(max=keys.shape[1] - 1)]

    return read


def _serve(
    cfg: EvictionConfig, prompt: int, prefix: int = 0, decode: int = 0, seed: int = 0
) -> tuple[RequestMemory, list[dict]]:
    """Feed a prompt (after a ``prefix``-token cache hit) and ``decode`` single tokens through
    the eviction steps as the runner does; after each step record what the bound allows."""
    g = torch.Generator().manual_seed(seed)
    total = prompt + decode
    keys = torch.randn(LAYERS, total, KV, D, generator=g)
    mem = RequestMemory(make_policy(cfg), LAYERS, BS, num_tokens=prefix, scored_tokens=0)
    chunks = [(s, min(cfg.interval, prompt - s)) for s in range(prefix, prompt, cfg.interval)]
    chunks += [(prompt + i, 1) for i in range(decode)]
    steps = []
    for start, n in chunks:
        mem.add_queries([torch.randn(n, H, D, generator=g) for _ in range(LAYERS)], start)
        if not mem.due(cfg.interval, prompt_len=prompt):
            continue
        live_before = mem.live_positions()
        pages_before = len(mem.live_pages)
        eviction_step(mem, cfg, _keys_reader(keys), D**-0.5, kv_heads=KV)
        # the step ranks the tokens its queries have seen (positions < scored_tokens)
        keep = mem.policy.budget.size(int((live_before < mem.scored_tokens).sum()), mem.num_tokens)
        first_unscored = (
            int(torch.cat(mem.query_positions).min()) if mem.query_positions else mem.num_tokens - 1
        )
        protect_from = min(first_unscored, mem.num_tokens - 1) // BS
        protected = {0} | {p for p in mem.live_pages if p >= protect_from}
        # pages holding only tokens no query has seen yet stay outside the step (and its budget)
        unseen = {p for p in mem.live_pages if p * BS >= mem.scored_tokens}
        steps.append(
            {
                "live": len(mem.live_pages),
                "before": pages_before,
                "budget": budget_pages(keep, BS),
                "protected": len(protected),
                "unseen": len(unseen),
                "live_pages": list(mem.live_pages),
            }
        )
    return mem, steps


@pytest.mark.parametrize("policy", RANKED_UNDER_BUDGET)
@pytest.mark.parametrize(
    "budget", [BudgetConfig(tokens=300), BudgetConfig(ratio=0.25)], ids=["tokens300", "ratio0.25"]
)
@pytest.mark.parametrize(
    "prompt, prefix", [(2000, 0), (1300, 0), (2017, 704)], ids=["2000", "1300", "2017-hit704"]
)
def test_page_selection_holds_the_budget_after_every_step(policy, budget, prompt, prefix):
    cfg = EvictionConfig(policy=policy, interval=512, budget=budget)
    assert cfg.selection == "page"
    mem, steps = _serve(cfg, prompt, prefix, decode=40)
    assert steps, "no eviction step ran"
    assert prompt % BS  # not a whole number of pages
    for s in steps:
        assert s["live"] <= s["budget"] + s["protected"], s
        # and exactly the budget (protected pages counted inside it) whenever the cache exceeded it
        seen = s["live"] - s["unseen"]
        assert seen == min(s["before"] - s["unseen"], max(s["budget"], s["protected"] - s["unseen"])), s
        assert 0 in s["live_pages"]
    assert mem.logical_pages - 1 in mem.live_pages  # the page being written
    pos = mem.live_positions()
    assert set((pos // BS).tolist()) == set(mem.live_pages) and mem.evicted_pages.isdisjoint(mem.live_pages)
    if budget.ratio is not None:
        assert len(mem.live_pages) <= 0.25 * mem.logical_pages + 4  # the ratio frees what it says


@pytest.mark.parametrize("policy", RANKED_UNDER_BUDGET)
def test_page_selection_frees_at_least_what_token_selection_frees(policy):
    """Under the token rule 'all' heads that disagree keep pages; page selection never holds more."""
    base = EvictionConfig(policy=policy, interval=512, budget=BudgetConfig(ratio=0.25))
    page, _ = _serve(base, 2500)
    token, _ = _serve(base.model_copy(update={"selection": "token"}), 2500)
    assert len(page.live_pages) <= len(token.live_pages)
    if policy == "l2":  # per-head key norms: every page has a token some head keeps
        assert len(token.live_pages) > 2 * len(page.live_pages), (len(token.live_pages), len(page.live_pages))


@pytest.mark.parametrize("page_score", ["mean", "max", "vote"])
def test_every_page_score_holds_the_budget(page_score):
    cfg = EvictionConfig(policy="h2o", interval=512, budget=BudgetConfig(tokens=256), page_score=page_score)
    _, steps = _serve(cfg, 2100)
    assert all(s["live"] == min(s["before"], max(s["budget"], s["protected"])) for s in steps), steps


def test_page_step_reports_token_statistics():
    """requested/realised still compare the policy's own token decisions with the freed pages."""
    cfg = EvictionConfig(policy="h2o", interval=512, budget=BudgetConfig(tokens=256))
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(LAYERS, 1024, KV, D, generator=g)
    mem = RequestMemory(make_policy(cfg), LAYERS, BS)
    mem.add_queries([torch.randn(1024, H, D, generator=g) for _ in range(LAYERS)], 0)
    stats = eviction_step(mem, cfg, _keys_reader(keys), D**-0.5, kv_heads=KV)
    assert len(stats.freed_pages) == 32 - 8
    # 1024 - 256 token evictions per (layer, head), most of them in freed pages
    assert stats.requested_token_evictions == LAYERS * KV * (1024 - 256)
    assert 0 < stats.realised_token_evictions <= stats.requested_token_evictions
