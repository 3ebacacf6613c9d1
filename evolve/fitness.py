"""Fitness = mean over tasks of (candidate score / full-cache score on the same prompts).

Per task the ratio is of *means* over the generation's prompts (as the seed code's
``aggregate_score_dict`` does), not a mean of per-prompt ratios, which would be
undefined whenever the full-cache model fails a prompt.

Edge cases, defined here once:

* a prompt whose candidate *or* baseline request failed is dropped from both sides
  (so the ratio stays over the same prompts) and counted in ``failed``;
* a task whose full-cache mean score is 0 has no meaningful ratio: it is excluded
  from the mean and listed in ``excluded``;
* if every task is excluded, fitness falls back to the mean *raw* candidate score
  over tasks (``mode="raw"``), so evolution still has a signal;
* no usable prompt at all → ``fitness=None`` (the caller decides; see loop.py);
* optional penalty: ``fitness -= retained_penalty * mean retained KV fraction``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class SampleOutcome:
    """One prompt's result for one candidate. ``None`` score = that request failed."""

    task: str
    candidate: float | None
    baseline: float | None
    retained_fraction: float = 1.0


class TaskFitness(BaseModel):
    task: str
    candidate_mean: float | None
    baseline_mean: float | None
    normalized: float | None
    samples: int
    failed: int


class FitnessResult(BaseModel):
    fitness: float | None
    mode: Literal["normalized", "raw", "none"]
    tasks: list[TaskFitness]
    excluded: list[str]
    retained_fraction: float | None
    samples: int
    failed: int


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute_fitness(outcomes: list[SampleOutcome], retained_penalty: float = 0.0) -> FitnessResult:
    by_task: dict[str, list[SampleOutcome]] = defaultdict(list)
    for o in outcomes:
        by_task[o.task].append(o)
    tasks: list[TaskFitness] = []
    excluded: list[str] = []
    retained: list[float] = []
    total_failed = 0
    for name, rows in by_task.items():
        ok = [r for r in rows if r.candidate is not None and r.baseline is not None]
        failed = len(rows) - len(ok)
        total_failed += failed
        retained.extend(r.retained_fraction for r in rows if r.candidate is not None)
        cand = _mean([r.candidate for r in ok])  # type: ignore[misc]
        base = _mean([r.baseline for r in ok])  # type: ignore[misc]
        norm = None
        if base is not None and base > 0 and cand is not None:
            norm = cand / base
        elif ok:
            excluded.append(name)
        tasks.append(
            TaskFitness(
                task=name,
                candidate_mean=cand,
                baseline_mean=base,
                normalized=norm,
                samples=len(ok),
                failed=failed,
            )
        )
    norms = [t.normalized for t in tasks if t.normalized is not None]
    raws = [t.candidate_mean for t in tasks if t.candidate_mean is not None]
    fitness: float | None
    if norms:
        mode, fitness = "normalized", sum(norms) / len(norms)
    elif raws:
        mode, fitness = "raw", sum(raws) / len(raws)
    else:
        mode, fitness = "none", None
    kept = _mean(retained)
    if fitness is not None and retained_penalty and kept is not None:
        fitness -= retained_penalty * kept
    return FitnessResult(
        fitness=fitness,
        mode=mode,
        tasks=tasks,
        excluded=excluded,
        retained_fraction=kept,
        samples=sum(t.samples for t in tasks),
        failed=total_failed,
    )
