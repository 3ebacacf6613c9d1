"""A thin ask/tell wrapper over ``cma.CMAEvolutionStrategy`` that *maximises* fitness.

The caller owns the loop (``ask`` → evaluate → ``tell``). pycma minimises, so
fitness is negated exactly once, here. pycma draws its samples from numpy's
*global* RNG, so a checkpoint stores that state too (:meth:`Strategy.state_dict`);
restoring both makes a resumed run ask the very same candidates.

Checkpoints of *our own* runs pickle the pycma object (it holds the full covariance
and its step-size paths; no stable public serialisation exists). Weights files are
never pickled: they go through :mod:`vllm_namm.weights`.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from evolve.config import CMAConfig


def elite_count(popsize: int, elite_ratio: float) -> int:
    """Parents kept per generation: floor(popsize * elite_ratio), at least 1 and at most popsize."""
    if popsize < 2:
        raise ValueError(f"popsize must be >= 2, got {popsize}")
    if not 0 < elite_ratio <= 1:
        raise ValueError(f"elite_ratio must be in (0, 1], got {elite_ratio}")
    return max(1, min(popsize, int(popsize * elite_ratio + 1e-9)))


def cma_options(cfg: CMAConfig) -> dict[str, Any]:
    """Map our settings onto pycma's CMAOptions; Hansen's defaults for everything else.

    ``CMA_mu`` = elite count (the paper's elite ratio 0.5 is also pycma's default
    popsize // 2, but a ratio must survive other popsizes), ``CMA_cmean`` = c_m.
    Logging to ``outcmaes/`` files and console output are off: we log ourselves.
    """
    opts: dict[str, Any] = {
        "popsize": cfg.popsize,
        "CMA_mu": elite_count(cfg.popsize, cfg.elite_ratio),
        "CMA_cmean": cfg.c_mean,
        "seed": cfg.seed,
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
    }
    clash = set(opts) & set(cfg.options)
    if clash:
        raise ValueError(f"cma.options must not set {sorted(clash)}: use the dedicated cma.* fields")
    opts.update(cfg.options)
    return opts


class Strategy:
    """CMA-ES over a flat parameter vector, maximising."""

    def __init__(self, x0: np.ndarray, cfg: CMAConfig, sigma0: float | None = None) -> None:
        import cma

        self.sigma0 = float(sigma0 if sigma0 is not None else cfg.sigma0)
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim != 1 or x0.size < 2:
            raise ValueError(f"x0 must be a flat vector of >= 2 parameters, got shape {x0.shape}")
        self.es = cma.CMAEvolutionStrategy(x0, self.sigma0, cma_options(cfg))
        self._pending: list[np.ndarray] | None = None

    @property
    def popsize(self) -> int:
        return int(self.es.popsize)

    @property
    def mean(self) -> np.ndarray:
        return np.array(self.es.mean, dtype=np.float64)

    @property
    def start(self) -> np.ndarray:
        """The point this strategy started from (its stage's x0)."""
        return np.array(self.es.x0, dtype=np.float64)

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    @property
    def generation(self) -> int:
        """Completed tell() calls."""
        return int(self.es.countiter)

    def ask(self) -> list[np.ndarray]:
        """One generation of candidates. Asking twice without telling returns the same batch."""
        if self._pending is None:
            self._pending = [np.array(x, dtype=np.float64) for x in self.es.ask()]
        return [x.copy() for x in self._pending]

    def tell(self, fitness: list[float] | np.ndarray) -> None:
        """Report fitness (higher is better) of the batch from :meth:`ask`, in order."""
        if self._pending is None:
            raise RuntimeError("tell() without a pending ask()")
        f = np.asarray(fitness, dtype=np.float64)
        if f.shape != (len(self._pending),):
            raise ValueError(f"expected {len(self._pending)} fitness values, got shape {f.shape}")
        if not np.all(np.isfinite(f)):
            raise ValueError(f"fitness must be finite, got {f.tolist()}")
        self.es.tell(self._pending, (-f).tolist())
        self._pending = None

    def stop(self) -> dict[str, Any]:
        """pycma's termination diagnostics (informational: stages run their configured generations)."""
        return dict(self.es.stop())

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: pycma object, numpy RNG, pending batch."""
        return {
            "es": pickle.dumps(self.es, protocol=pickle.HIGHEST_PROTOCOL),
            "np_random": np.random.get_state(),
            "pending": self._pending,
            "sigma0": self.sigma0,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Strategy:
        obj = cls.__new__(cls)
        obj.es = pickle.loads(state["es"])
        obj._pending = state["pending"]
        obj.sigma0 = state["sigma0"]
        np.random.set_state(state["np_random"])
        return obj
