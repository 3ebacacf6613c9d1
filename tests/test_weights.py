"""Weights file format: round trip, every error path, the inspect CLI on the shipped file."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from vllm_namm.policies import DEFAULT_WEIGHTS
from vllm_namm.scorers import ScorerConfig
from vllm_namm.weights import NammWeights, WeightsError, describe, load_weights, save_weights


def _weights():
    w = NammWeights.zeros()
    w.params = torch.randn(w.params.numel())
    w.threshold = 0.25
    return w


def test_round_trip(tmp_path):
    w = _weights()
    save_weights(tmp_path / "w.safetensors", w)
    back = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(back.params, w.params) and back.threshold == 0.25
    assert back.scorer == w.scorer and back.features == w.features
    mlp = NammWeights.zeros(ScorerConfig(kind="mlp"))
    save_weights(tmp_path / "m.safetensors", mlp)
    assert load_weights(tmp_path / "m.safetensors").build_scorer().num_params == 1326


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(p)


def _write_raw(path, meta_edit=None, tensors_edit=None):
    w = _weights()
    save_weights(path, w)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["namm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta_edit:
        meta_edit(meta)
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, str(path), metadata={"namm": json.dumps(meta)})
    return path


def test_unknown_format_version(tmp_path):
    p = _write_raw(tmp_path / "v.safetensors", meta_edit=lambda m: m.update(format_version=99))
    with pytest.raises(WeightsError, match="unknown format_version 99"):
        load_weights(p)


def test_unknown_scorer_kind(tmp_path):
    p = _write_raw(tmp_path / "k.safetensors", meta_edit=lambda m: m["scorer"].update(kind="transformer"))
    with pytest.raises(WeightsError, match="unknown scorer kind 'transformer'"):
        load_weights(p)


def test_shape_mismatch(tmp_path):
    p = _write_raw(tmp_path / "s.safetensors", tensors_edit=lambda t: t.update(norm_mean=torch.zeros(16)))
    with pytest.raises(WeightsError, match="norm_mean.*shape"):
        load_weights(p)
    p = _write_raw(tmp_path / "p.safetensors", meta_edit=lambda m: m["scorer"].update(hidden=16))
    with pytest.raises(WeightsError, match="parameters|shape"):
        load_weights(p)


def test_nan_values(tmp_path):
    def poison(t):
        t["params"][3] = float("nan")

    p = _write_raw(tmp_path / "n.safetensors", tensors_edit=poison)
    with pytest.raises(WeightsError, match="NaN or inf"):
        load_weights(p)
    w = _weights()
    w.norm_std[0] = float("inf")
    with pytest.raises(WeightsError, match="NaN or inf"):
        save_weights(tmp_path / "never.safetensors", w)


def test_save_refuses_metadata_the_loader_would(tmp_path):
    """A config edited with model_copy skips pydantic's checks; save validates it as load reads it."""
    w = _weights()
    w.features = w.features.model_copy(update={"ema_coeff_per_step": 1.5})
    with pytest.raises(WeightsError, match="ema_coeff_per_step"):
        save_weights(tmp_path / "never.safetensors", w)
    assert not (tmp_path / "never.safetensors").exists()


def test_inspect_cli_on_shipped_file():
    r = subprocess.run(
        [sys.executable, "-m", "vllm_namm.weights", "inspect", str(DEFAULT_WEIGHTS)],
        capture_output=True,
        text=True,
        timeout=600,  # bounds a hang only: torch imports take long on a busy machine
    )
    assert r.returncode == 0, r.stderr
    assert "MLP" in r.stdout and "1431" in r.stdout and "n_up 512" in r.stdout and "budget of 0.3" in r.stdout
    assert (
        "+ key L2 norm" in r.stdout
        and '"generations":8' in r.stdout
        and '"command":"python -m evolve' in r.stdout
    )  # provenance
    hand = subprocess.run(
        [sys.executable, "-m", "vllm_namm.weights", "inspect", "hand"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert hand.returncode == 0 and "BAM" in hand.stdout and "4172" in hand.stdout, hand.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "vllm_namm.weights", "inspect", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1 and "no such weights file" in bad.stderr


def test_weights_evolved_under_a_budget_rank_under_it_by_default(tmp_path):
    """A file's budget_ratio is namm's default rule; an explicit threshold or budget wins."""
    from vllm_namm.config import BudgetConfig, EvictionConfig
    from vllm_namm.policies import make_policy

    w = NammWeights.zeros()
    w.budget_ratio = 0.3
    path = tmp_path / "budget.safetensors"
    save_weights(path, w)
    assert load_weights(path).budget_ratio == 0.3
    assert "rank under a budget of 0.3" in describe(load_weights(path))
    default = make_policy(EvictionConfig(policy="namm", weights=path))
    assert default.budget == BudgetConfig(ratio=0.3)
    assert make_policy(EvictionConfig(policy="namm", weights=path, threshold=0.5)).budget is None
    explicit = make_policy(EvictionConfig(policy="namm", weights=path, budget=BudgetConfig(tokens=512)))
    assert explicit.budget == BudgetConfig(tokens=512)


def test_weights_carry_their_page_score(tmp_path):
    """Weights evolved with mean page scores keep ranking pages by the mean on a server whose
    --kv-eviction-page-score is max; other policies and files without one use the server's."""
    from vllm_namm.config import EvictionConfig
    from vllm_namm.policies import make_policy

    w = NammWeights.zeros()
    w.budget_ratio, w.page_score = 0.25, "mean"
    path = tmp_path / "mean.safetensors"
    save_weights(path, w)
    assert load_weights(path).page_score == "mean"
    assert "page score under a budget: mean" in describe(load_weights(path))
    assert make_policy(EvictionConfig(policy="namm", weights=path, page_score="max")).page_score == "mean"
    assert make_policy(EvictionConfig(policy="namm")).page_score is None
    h2o = make_policy(EvictionConfig(policy="h2o", budget={"ratio": 0.25}, page_score="mean"))
    assert h2o.page_score is None
