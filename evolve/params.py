"""The evolved vector ↔ weights file ↔ per-request settings.

The CMA-ES vector is the scorer's flat parameter vector (``NammWeights.params``, the
layout of the weights file the server was started with) or, with ``scorer_layers:
"output"``, only its final layer's tail of it (the rest fixed), optionally followed by the
extra evolved scalars of :class:`~evolve.config.ExtraParamsConfig`. This module is the
only place that knows that layout.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from evolve.config import ExtraParamsConfig
from vllm_namm.config import PolicyName


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _output_layer_size(scorer_cfg: Any) -> int:
    """Parameters of the scorer's final linear layer (weights and bias), the flat vector's tail."""
    from vllm_namm.scorers import make_scorer

    n_in, n_out = make_scorer(scorer_cfg).shapes[-1]
    return n_in * n_out + (n_out if scorer_cfg.bias else 0)


class ParamSpace:
    """Layout of the evolved vector for one start weights file."""

    def __init__(self, weights: Any, extra: ExtraParamsConfig) -> None:
        self.weights = weights  # vllm_namm.weights.NammWeights
        self.extra = extra
        total = int(weights.params.numel())
        # the evolved scorer parameters are a tail of the flat vector: all, or the output layer's
        self.first = 0 if extra.scorer_layers == "all" else total - _output_layer_size(weights.scorer)
        self.num_scorer = total - self.first
        self.dim = self.num_scorer + int(extra.evolve_gamma) + int(extra.evolve_threshold)

    @classmethod
    def from_file(cls, path: str | Path, extra: ExtraParamsConfig) -> ParamSpace:
        from vllm_namm.weights import load_weights

        return cls(load_weights(path), extra)

    def x0(self, zeros: bool = False) -> np.ndarray:
        """Start point: the file's parameters (or zeros: scores 0, evicts nothing), then the extras."""
        params = self.weights.params.double().numpy()[self.first :]
        parts = [np.zeros_like(params) if zeros else params]
        if self.extra.evolve_gamma:
            g = (
                self.extra.gamma_init
                if self.extra.gamma_init is not None
                else self.weights.features.ema_coeff_per_step
            )
            parts.append(np.array([_logit(g)]))
        if self.extra.evolve_threshold:
            t = self.extra.threshold_init if self.extra.threshold_init is not None else self.weights.threshold
            parts.append(np.array([t]))
        return np.concatenate(parts).astype(np.float64)

    def split(self, x: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
        """(all scorer params, EMA coefficient per step or None, threshold or None)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.dim,):
            raise ValueError(f"expected a vector of {self.dim} parameters, got shape {x.shape}")
        i = self.num_scorer
        gamma = threshold = None
        if self.extra.evolve_gamma:
            gamma = _sigmoid(float(x[i]))
            i += 1
        if self.extra.evolve_threshold:
            threshold = float(x[i])
        params = self.weights.params.double().numpy().copy()
        params[self.first :] = x[: self.num_scorer]
        return params, gamma, threshold

    def xargs(self, x: np.ndarray, eviction: PolicyName = "namm") -> dict[str, Any]:
        """``vllm_xargs`` for one candidate: the full flat vector travels with every request."""
        params, gamma, threshold = self.split(x)
        out: dict[str, Any] = {"kv_eviction": eviction, "namm_params": params.tolist()}
        if threshold is not None:
            out["namm_threshold"] = threshold
        if gamma is not None:
            out["namm_ema_coeff_per_step"] = gamma
        return out

    def export(
        self,
        path: str | Path,
        x: np.ndarray,
        *,
        base_model: str | None,
        stages: list[str],
        generations: int,
        fitness: float | None,
        retained_fraction: float | None,
        mode: str | None = None,
        fitness_kind: str | None = None,
        command: str | None = None,
        budget_ratio: float | None = None,
        description: str = "evolved with python -m evolve (CMA-ES; best mean)",
    ) -> Path:
        """Write ``x`` as a weights file ``vllm serve --namm-weights`` loads (start file's features/stats)."""
        import torch

        from vllm_namm.model_match import shape_of_model
        from vllm_namm.weights import NammWeights, Provenance, save_weights

        params, gamma, threshold = self.split(x)
        w = self.weights
        features = (
            w.features if gamma is None else w.features.model_copy(update={"ema_coeff_per_step": gamma})
        )
        out = NammWeights(
            scorer=w.scorer,
            features=features,
            params=torch.tensor(params, dtype=torch.float32),
            norm_mean=w.norm_mean.clone(),
            norm_std=w.norm_std.clone(),
            threshold=w.threshold if threshold is None else threshold,
            budget_ratio=budget_ratio,
            page_score=w.page_score,
            provenance=Provenance(
                description=description,
                base_model=base_model,
                stages=stages,
                generations=generations,
                fitness=None if fitness is None else float(fitness),
                retained_fraction=None if retained_fraction is None else float(retained_fraction),
                mode=mode,
                fitness_kind=fitness_kind,
                command=command,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                model_shape=shape_of_model(base_model) or (w.provenance and w.provenance.model_shape),
            ),
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_weights(tmp, out)
        tmp.replace(path)
        return path
