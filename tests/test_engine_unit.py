"""Engine pieces without a server: paged memory, eviction steps, compaction, settings, flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import pytest
import torch

from vllm_namm.config import BudgetConfig, EvictionConfig
from vllm_namm.policies import make_policy
from vllm_namm.request_memory import RequestMemory, eviction_step
from vllm_namm.vllm_patch.request_settings import (
    RequestSettings,
    RequestSettingsError,
    parse_request_settings,
    validate_for_server,
)

BS = 32
KV, H, D = 2, 4, 32


def _keys_reader(keys: torch.Tensor):
    def read(layer: int, pages: list[int]) -> torch.Tensor:
        idx = torch.cat([torch.arange(p * BS, (p + 1) * BS) for p in pages])
        return keys[layer][idx.clamp(max=keys.shape[1] - 1)]

    return read


def _run(cfg: EvictionConfig, n_tokens: int, layers: int = 2, seed: int = 0) -> RequestMemory:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(layers, n_tokens, KV, D, generator=g)
    mem = RequestMemory(make_policy(cfg), layers, BS)
    for start in range(0, n_tokens, cfg.interval):
        n = min(cfg.interval, n_tokens - start)
        mem.add_queries([torch.randn(n, H, D, generator=g) for _ in range(layers)], start)
        if mem.due(cfg.interval, prompt_len=n_tokens):
            eviction_step(mem, cfg, _keys_reader(keys), D**-0.5, kv_heads=KV)
    return mem


def test_streaming_keeps_budget_pages_and_protects_first_and_last_page() -> None:
    cfg = EvictionConfig(
        policy="streaming", interval=512, budget=BudgetConfig(tokens=256), streaming_sinks=32
    )
    mem = _run(cfg, 3000)
    live = mem.live_pages
    assert 0 in live, "the first page (attention sink) is always kept"
    assert mem.logical_pages - 1 in live, "the page being written is always kept"
    assert len(live) <= -(-256 // BS) + 2
    assert mem.num_unscored == 3000 % 16  # the prompt tail is scored down to whole STFT hops


def test_step_runs_every_interval_and_at_prompt_end() -> None:
    cfg = EvictionConfig(policy="streaming", interval=512, budget=BudgetConfig(tokens=256))
    mem = _run(cfg, 1300)
    assert mem.steps == 3  # at 512, 1024, and the 276-token prompt tail (floored to 272)
    assert mem.num_unscored == 4  # 1300 - 1296: less than one STFT hop waits for decode


def test_evicted_pages_are_never_reported_twice_and_positions_stay_logical() -> None:
    cfg = EvictionConfig(policy="streaming", interval=512, budget=BudgetConfig(tokens=128))
    mem = _run(cfg, 2048)
    pos = mem.live_positions()
    assert torch.equal(pos, torch.sort(pos).values)
    assert set((pos // BS).tolist()) == set(mem.live_pages)
    assert mem.evicted_pages.isdisjoint(mem.live_pages)


def test_namm_with_zero_params_evicts_nothing() -> None:
    cfg = EvictionConfig(
        policy="namm", weights="hand"
    )  # threshold rule (the evolved default ranks under a budget)
    policy = make_policy(cfg)
    mem = RequestMemory(policy, 2, BS, params=torch.zeros(policy.num_params))
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 1024, KV, D, generator=g)
    mem.add_queries([torch.randn(1024, H, D, generator=g) for _ in range(2)], 0)
    stats = eviction_step(mem, cfg, _keys_reader(keys), D**-0.5, kv_heads=KV)
    assert stats.freed_pages == [] and stats.requested_token_evictions == 0


def test_page_rule_any_frees_more_than_all() -> None:
    base = EvictionConfig(policy="h2o", interval=512, budget=BudgetConfig(ratio=0.5), selection="token")
    freed_all = len(_run(base, 2048).evicted_pages)
    freed_any = len(_run(base.model_copy(update={"page_rule": "any"}), 2048).evicted_pages)
    assert freed_any > freed_all


# ---- block-table compaction -------------------------------------------------------------------


@dataclass
class FakeCM:
    """The fields of vLLM's CommonAttentionMetadata that compaction touches."""

    block_table_tensor: torch.Tensor
    seq_lens: torch.Tensor
    seq_lens_cpu_upper_bound: torch.Tensor | None
    num_reqs: int
    max_seq_len: int
    _num_computed_tokens_cache: torch.Tensor | None = None

    def replace(self, **kw):
        return replace(self, **kw)


def test_compaction_removes_holes_and_shortens_seq_lens() -> None:
    from vllm_namm.vllm_patch.holes import compact_metadata

    table = torch.tensor([[5, 0, 7, 0, 9, 0, 0], [3, 4, 6, 0, 0, 0, 0]], dtype=torch.int32)
    seq = torch.tensor([4 * BS + 10, 2 * BS + 5])
    cm = FakeCM(table, seq, seq.clone(), 2, int(seq.max()))
    out = compact_metadata(cm, {0: 2}, BS)
    assert out.block_table_tensor[0, :3].tolist() == [5, 7, 9]
    assert out.block_table_tensor[0, 3:].eq(0).all()
    assert out.seq_lens.tolist() == [2 * BS + 10, 2 * BS + 5]
    assert out.seq_lens_cpu_upper_bound.tolist() == out.seq_lens.tolist()
    assert out.max_seq_len == 2 * BS + 10
    assert torch.equal(out.block_table_tensor[1], table[1]), "rows without holes are untouched"
    assert table[0].tolist() == [5, 0, 7, 0, 9, 0, 0], "the runner's own table is not modified"
    with pytest.raises(RuntimeError, match="holes"):
        compact_metadata(cm, {0: 1}, BS)


# ---- per-request settings ---------------------------------------------------------------------


def test_request_settings_validation() -> None:
    server = EvictionConfig(policy="namm")
    assert parse_request_settings({"other_plugin": 1}).is_default
    with pytest.raises(RequestSettingsError, match="kv_eviction"):
        parse_request_settings({"kv_eviction": "bogus"})
    with pytest.raises(RequestSettingsError, match="kv_eviction_budgte"):
        parse_request_settings({"kv_eviction_budgte": 3})
    with pytest.raises(RequestSettingsError, match="NaN"):
        parse_request_settings({"namm_params": [1.0, float("nan")]})
    bad_len = parse_request_settings({"namm_params": [0.0, 1.0]})
    with pytest.raises(RequestSettingsError, match="needs 7"):
        validate_for_server(bad_len, server, lambda cfg: 7)
    with pytest.raises(RequestSettingsError, match="budget"):
        validate_for_server(RequestSettings(kv_eviction="h2o"), server, lambda cfg: 7)
    ok = RequestSettings(kv_eviction="streaming", kv_eviction_ratio=0.25)
    validate_for_server(ok, server, lambda cfg: 7)
    assert ok.apply(server).budget.ratio == 0.25
    with pytest.raises(RequestSettingsError, match="--kv-eviction none"):
        validate_for_server(RequestSettings(kv_eviction="namm"), EvictionConfig(), lambda cfg: 7)


def test_flags_map_to_eviction_config() -> None:
    from vllm_namm.vllm_patch.cli import add_flags, config_from_args
    from vllm_namm.vllm_patch.engine_config import NammConfigError

    parser = argparse.ArgumentParser()
    add_flags(parser)
    assert config_from_args(parser.parse_args([])) is None
    cfg = config_from_args(
        parser.parse_args(
            ["--kv-eviction", "h2o", "--kv-eviction-ratio", "0.25", "--kv-eviction-recent-tokens", "8"]
        )
    )
    assert cfg["policy"] == "h2o" and cfg["budget"]["ratio"] == 0.25 and cfg["protect"]["recent_tokens"] == 8
    with pytest.raises(NammConfigError, match="budget"):
        config_from_args(parser.parse_args(["--kv-eviction", "streaming"]))
    with pytest.raises(NammConfigError, match="interval"):
        config_from_args(parser.parse_args(["--kv-eviction", "namm", "--kv-eviction-interval", "500"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-eviction", "bogus"])


def test_ratio_budget_is_a_fraction_of_the_context_not_compounded() -> None:
    cfg = EvictionConfig(policy="streaming", interval=512, budget=BudgetConfig(ratio=0.25))
    mem = _run(cfg, 2048)
    kept = mem.live_positions().numel()
    # 25 % of 2048 tokens, plus at most the first page and the page being written; compounding
    # (25 % of what was left at every step) would keep ~1/4 of that.
    assert 512 <= kept <= 512 + 2 * BS, kept


def test_tokens_no_query_has_seen_stay_out_of_the_scorer(tmp_path) -> None:
    """The prompt-end step scores only tokens its queries attended (evo-memory never scores the
    others): a 1000-token prompt's step covers tokens 0..991, and the scores of those tokens are
    those of a 992-token prompt, whatever the 8 unseen tokens are."""
    from vllm_namm.weights import NammWeights, save_weights

    w = NammWeights.zeros()
    w.params = 0.3 * torch.randn(w.params.shape, generator=torch.Generator().manual_seed(0))
    save_weights(tmp_path / "w.safetensors", w)
    cfg = EvictionConfig(policy="namm", weights=tmp_path / "w.safetensors")
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 1000, KV, D, generator=g)
    queries = torch.randn(2, 1000, H, D, generator=g)
    seen: list[list[torch.Tensor]] = []
    for n_tokens in (1000, 992):
        policy = make_policy(cfg)
        scored: list[torch.Tensor] = []
        original = policy.score_prepared

        def spy(prepared, original=original, scored=scored):
            out = original(prepared)
            scored.extend(s.clone() for s in out)
            return out

        policy.score_prepared = spy  # type: ignore[method-assign]
        mem = RequestMemory(policy, 2, BS)
        for start in range(0, n_tokens, 512):
            n = min(512, n_tokens - start)
            mem.add_queries([queries[layer, start : start + n] for layer in range(2)], start)
            if mem.due(512, prompt_len=n_tokens):
                eviction_step(mem, cfg, _keys_reader(keys[:, :n_tokens]), D**-0.5, kv_heads=KV)
        assert mem.steps == 2 and mem.scored_tokens == 992
        seen.append(scored)
    assert [s.shape for s in seen[0]] == [s.shape for s in seen[1]]  # never the 8 unseen tokens
    for a, b in zip(*seen, strict=True):
        torch.testing.assert_close(a, b)


def test_steps_fall_at_interval_multiples_whatever_the_chunking(tmp_path) -> None:
    """A chunk shortened by other requests' decode tokens must not move the next steps: they
    still cover queries 0..511 and 512..1023 and score exactly what aligned chunks score."""
    from vllm_namm.weights import NammWeights, save_weights

    w = NammWeights.zeros()
    w.params = 0.3 * torch.randn(w.params.shape, generator=torch.Generator().manual_seed(0))
    save_weights(tmp_path / "w.safetensors", w)
    cfg = EvictionConfig(policy="namm", weights=tmp_path / "w.safetensors", interval=512)
    n_tokens, g = 2000, torch.Generator().manual_seed(7)
    keys = torch.randn(2, n_tokens, KV, D, generator=g)
    queries = torch.randn(2, n_tokens, H, D, generator=g)

    def run(chunks: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        policy = make_policy(cfg)
        scored: list[torch.Tensor] = []
        original = policy.score_prepared

        def spy(prepared):
            out = original(prepared)
            scored.extend(x.clone() for x in out)
            return out

        policy.score_prepared = spy  # type: ignore[method-assign]
        mem = RequestMemory(policy, 2, BS)
        boundaries, start = [], 0
        for n in chunks:
            mem.add_queries([queries[layer, start : start + n] for layer in range(2)], start)
            start += n
            if mem.due(cfg.interval, prompt_len=n_tokens):
                eviction_step(mem, cfg, _keys_reader(keys[:, :start]), D**-0.5, kv_heads=KV)
                boundaries.append(mem.scored_tokens)
        return boundaries, scored

    aligned = run([512, 512, 512, 464])
    shifted = run([509, 512, 512, 467])  # the first chunk lost 3 tokens to decodes
    assert aligned[0] == [512, 1024, 1536, 2000]
    assert shifted[0][:2] == [512, 1024]  # not 1021, 1533
    # one score tensor per step and layer; the shifted tail waits for the next forward
    assert len(aligned[1]) == 8 and len(shifted[1]) == 6
    for a, b in zip(aligned[1][:4], shifted[1][:4], strict=True):  # steps at 512 and 1024
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)
    # a backlog (the previous step still pending under a lag) is taken in whole intervals
    shifted_backlog = run([1100, 900])
    assert shifted_backlog[0] == [1024, 1536]  # then the 464-token tail at the next forward
