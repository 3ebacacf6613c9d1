"""NAMM weights files: safetensors tensors + pydantic-validated JSON metadata. Never pickle.

Tensors: ``params`` [P] (the scorer's flat vector), ``norm_mean`` / ``norm_std`` [bins (+1 with
the key-norm feature)] (normalisation statistics of the spectrogram features). Metadata: the
safetensors header's ``__metadata__[META_KEY]`` holds the JSON of :class:`WeightsMeta`.

``python -m vllm_namm.weights inspect FILE`` prints what a file holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vllm_namm.model_match import ModelShape
from vllm_namm.scorers import Scorer, ScorerConfig, make_scorer
from vllm_namm.settings import FeatureConfig, PageScore
from vllm_namm.shipped_weights import DEFAULT_WEIGHTS, resolve_weights

FORMAT_VERSION = 1
NAMESPACE = "namm"
"""vllm-namm's key wherever it keeps data in a container of others: a weights file's safetensors
header, vLLM's ``additional_config``, a finished request's ``kv_transfer_params``."""
META_KEY = NAMESPACE


class WeightsError(ValueError):
    """A weights file is unusable; the message names the file and the problem."""


class Provenance(BaseModel):
    """Where the weights came from (optional, informative only)."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = None
    base_model: str | None = None
    stages: list[str] = Field(default_factory=list)
    generations: int | None = None
    fitness: float | None = None
    retained_fraction: float | None = None
    mode: str | None = Field(None, description="how the scores were used: 'threshold' or 'budget ratio R'")
    fitness_kind: str | None = Field(None, description="exact_match or loglik")
    date: str | None = None
    command: str | None = None
    model_shape: ModelShape | None = Field(
        None, description="the shape of the model the weights were evolved for (vllm_namm.model_match)"
    )


class WeightsMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["vllm-namm-weights"] = "vllm-namm-weights"
    format_version: int
    scorer: ScorerConfig
    features: FeatureConfig
    num_params: int
    threshold: float = Field(0.0, allow_inf_nan=False)
    budget_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="weights evolved to rank under a memory budget: the budget (fraction of the context) "
        "`--kv-eviction namm` uses when no budget or threshold is given; None = the threshold rule",
    )
    page_score: PageScore | None = Field(
        None,
        description="how the scores become page scores under a budget, as evolved (max, mean or vote); "
        "None = the server's --kv-eviction-page-score",
    )
    provenance: Provenance | None = None


@dataclass
class NammWeights:
    """Everything a NAMM policy needs besides the runtime config."""

    scorer: ScorerConfig
    features: FeatureConfig
    params: Tensor
    norm_mean: Tensor
    norm_std: Tensor
    threshold: float = 0.0
    provenance: Provenance | None = None
    budget_ratio: float | None = None
    """Evolved to rank under this budget (fraction of the context): the default rule; None = threshold."""
    page_score: PageScore | None = None
    """The page aggregation the weights were evolved with under a budget; None = the server's."""

    def build_scorer(self) -> Scorer:
        scorer = make_scorer(self.scorer)
        scorer.from_flat(self.params)
        return scorer

    @classmethod
    def zeros(cls, scorer: ScorerConfig | None = None, features: FeatureConfig | None = None) -> NammWeights:
        """The evolution starting point: all parameters 0 (scores 0, evicts nothing), identity stats."""
        features = features or FeatureConfig()
        scorer = scorer or ScorerConfig(input_dim=features.input_dim)
        n = make_scorer(scorer).num_params
        d = features.normalised_dims
        return cls(scorer, features, torch.zeros(n), torch.zeros(d), torch.ones(d))


def _check(w: NammWeights, where: str) -> None:
    if w.scorer.input_dim != w.features.input_dim:
        raise WeightsError(
            f"{where}: scorer input_dim {w.scorer.input_dim} != features "
            f"({w.features.pos_dims} oldness + {w.features.bins} bins"
            f"{' + key norm' if w.features.key_norm else ''})"
        )
    n = make_scorer(w.scorer).num_params
    shapes = {
        "params": (w.params, (n,)),
        "norm_mean": (w.norm_mean, (w.features.normalised_dims,)),
        "norm_std": (w.norm_std, (w.features.normalised_dims,)),
    }
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise WeightsError(
                f"{where}: tensor '{name}' has shape {tuple(t.shape)}, metadata implies {shape}"
            )
        if not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{where}: tensor '{name}' contains NaN or inf")
    if bool((w.norm_std < 0).any()):
        raise WeightsError(f"{where}: norm_std must be >= 0")


def save_weights(path: str | Path, weights: NammWeights) -> None:
    """Write ``weights`` to ``path`` (validated first, so a bad file is never produced)."""
    path = Path(path)
    _check(weights, str(path))
    meta = WeightsMeta(
        format_version=FORMAT_VERSION,
        scorer=weights.scorer,
        features=weights.features,
        num_params=int(weights.params.numel()),
        threshold=weights.threshold,
        provenance=weights.provenance,
        budget_ratio=weights.budget_ratio,
        page_score=weights.page_score,
    )
    try:  # as load_weights reads it: a config edited with model_copy is not validated on its own
        WeightsMeta.model_validate_json(meta.model_dump_json())
    except ValidationError as e:
        raise WeightsError(f"{path}: invalid metadata: {_first_error(e)}") from e
    tensors = {
        "params": weights.params.detach().float().contiguous().cpu(),
        "norm_mean": weights.norm_mean.detach().float().contiguous().cpu(),
        "norm_std": weights.norm_std.detach().float().contiguous().cpu(),
    }
    save_file(tensors, str(path), metadata={META_KEY: meta.model_dump_json()})


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" + (
        f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    )


def load_weights(path: str | Path) -> NammWeights:
    """Read and validate a weights file; every problem is a :class:`WeightsError`."""
    path = resolve_weights(path)
    where = str(path)
    if not path.is_file():
        raise WeightsError(f"{where}: no such weights file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{where}: not a safetensors file ({e})") from e
    if META_KEY not in header:
        raise WeightsError(
            f"{where}: no '{META_KEY}' metadata in the safetensors header (not a NAMM weights file)"
        )
    try:
        raw = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise WeightsError(f"{where}: metadata is not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: metadata must be a JSON object")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{where}: unknown format_version {version!r} (this vllm-namm reads {FORMAT_VERSION})"
        )
    kind = (raw.get("scorer") or {}).get("kind") if isinstance(raw.get("scorer"), dict) else None
    if kind not in ("bam", "mlp"):
        raise WeightsError(f"{where}: unknown scorer kind {kind!r} (expected 'bam' or 'mlp')")
    try:
        meta = WeightsMeta.model_validate(raw)
    except ValidationError as e:
        raise WeightsError(f"{where}: invalid metadata: {_first_error(e)}") from e
    missing = [k for k in ("params", "norm_mean", "norm_std") if k not in tensors]
    if missing:
        raise WeightsError(f"{where}: missing tensor(s) {missing}")
    w = NammWeights(
        scorer=meta.scorer,
        features=meta.features,
        params=tensors["params"].float(),
        norm_mean=tensors["norm_mean"].float(),
        norm_std=tensors["norm_std"].float(),
        threshold=meta.threshold,
        provenance=meta.provenance,
        budget_ratio=meta.budget_ratio,
        page_score=meta.page_score,
    )
    if meta.num_params != w.params.numel():
        raise WeightsError(
            f"{where}: metadata says {meta.num_params} parameters, tensor 'params' has {w.params.numel()}"
        )
    _check(w, where)
    return w


class WeightsStore:
    """The one way the engine reads weights files: each file once per store, ``None`` = the shipped
    default. Whoever builds policies owns one (the worker, the scheduler, the API server).

    ``fixed``: every lookup returns these weights (a caller that already holds them)."""

    def __init__(self, fixed: NammWeights | None = None) -> None:
        self.fixed = fixed
        self._loaded: dict[Path, NammWeights] = {}

    def get(self, path: str | Path | None) -> NammWeights:
        if self.fixed is not None:
            return self.fixed
        path = resolve_weights(path or DEFAULT_WEIGHTS)
        if path not in self._loaded:
            self._loaded[path] = load_weights(path)
        return self._loaded[path]


def shipped_weights_for(served: ModelShape | None) -> tuple[str, Path] | None:
    """The first shipped weights (in ``SHIPPED_WEIGHTS`` order) evolved for a model of ``served``'s
    shape, as (name, file); None when none was (then the plugin's default applies)."""
    from vllm_namm.shipped_weights import SHIPPED_WEIGHTS

    if served is None:
        return None
    for name, path in SHIPPED_WEIGHTS.items():
        provenance = load_weights(path).provenance
        if provenance is not None and provenance.model_shape == served:
            return name, path
    return None


def describe(w: NammWeights) -> str:
    f = w.features
    lines = [
        f"scorer: {w.scorer.kind.upper()} (input {w.scorer.input_dim}, hidden {w.scorer.hidden}, "
        f"bias {w.scorer.bias}"
        + (f", {w.scorer.mlp_layers} layers" if w.scorer.kind == "mlp" else "")
        + (f", window {w.scorer.window}" if w.scorer.window is not None else "")
        + ")",
        f"parameters: {w.params.numel()} (|p|max {w.params.abs().max().item():.4g})",
        f"features: n_up {f.n_up}, n_w {f.n_w}, s_w {f.s_w}, bins {f.bins}, "
        f"ema {f.ema_coeff_per_step}/step (gamma {f.gamma:.4f}/frame), oldness {f.pos_dims} dims "
        f"(max freq {f.pos_max_freq:g}, oldness from {f.start_oldness_from})"
        + (", + key L2 norm" if f.key_norm else ""),
        f"threshold: keep score >= {w.threshold}"
        if w.budget_ratio is None
        else f"rule: rank under a budget of {w.budget_ratio:g} of the context (the default of --kv-eviction namm; "
        f"--namm-threshold switches to the threshold rule, keep score >= {w.threshold})",
        f"page score under a budget: {w.page_score or 'the server setting'}",
        f"normalisation mean: {[round(x, 5) for x in w.norm_mean.tolist()]}",
        f"normalisation std: {[round(x, 5) for x in w.norm_std.tolist()]}",
    ]
    if w.provenance is not None:
        lines.append(f"provenance: {w.provenance.model_dump_json(exclude_none=True)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_namm.weights", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("inspect", help="print a weights file's contents").add_argument("file")
    args = parser.parse_args(argv)
    try:
        w = load_weights(args.file)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(w))
    return 0


if __name__ == "__main__":
    sys.exit(main())
