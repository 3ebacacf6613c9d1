"""Drawing a generation's prompts: the same prompts for every candidate, fresh ones every generation.

Draws are a pure function of (run seed, stage, generation, task index), so a resumed
run draws exactly what an uninterrupted one would, with no RNG state to checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from evolve.config import TaskConfig

SYNTHETIC_MAX_TOKENS = 16


@dataclass(frozen=True)
class EvalSample:
    task: str
    key: str  # unique within a run: task + sample id
    prompt: str
    max_tokens: int
    score: Callable[[str], float]
    truncate_to: int | None = None  # LongBench middle truncation (server tokenizer), if configured
    answer: str | None = None
    """The reference answer as the model should continue the prompt (log-likelihood fitness)."""


def generation_rng(seed: int, stage: int, generation: int, task: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, generation, task])


class TaskPool:
    """All prompts one task can draw from."""

    def __init__(self, cfg: TaskConfig, count_tokens: Callable[[str], int] = len) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._count = count_tokens
        if cfg.kind == "longbench":
            from evolve.tasks.longbench import load_longbench

            assert cfg.path is not None and cfg.dataset is not None
            self._rows = load_longbench(cfg.path, cfg.dataset)
            self.size = len(self._rows)
        else:
            self.size = cfg.pool_size

    def sample(self, index: int) -> EvalSample:
        cfg = self.cfg
        if cfg.kind == "longbench":
            from evolve.tasks.longbench import score_sample

            row = self._rows[index]
            return EvalSample(
                task=self.name,
                key=f"{self.name}#{index}",
                prompt=row.prompt,
                max_tokens=cfg.max_tokens or row.max_tokens,
                score=lambda text, row=row: score_sample(row, text),
                truncate_to=cfg.max_prompt_tokens,
                answer=row.answers[0],
            )
        length = cfg.target_tokens[index % len(cfg.target_tokens)]
        if cfg.is_realtext:
            from evolve.tasks.realtext import score_answer as score_realtext

            assert cfg.tokenizer is not None  # TaskConfig's validator
            r = _realtext(cfg.realtext_kind, index, length, str(cfg.tokenizer), cfg.essays)
            return EvalSample(
                task=self.name,
                key=f"{self.name}#{index}",
                prompt=r.prompt,
                max_tokens=cfg.max_tokens or r.max_tokens,
                score=lambda text, r=r: score_realtext(text, r),
                answer=r.continuation,
            )
        from evolve.tasks.synthetic import score_answer

        s = _synthetic(cfg.kind, index, length, self._count)
        return EvalSample(
            task=self.name,
            key=f"{self.name}#{index}",
            prompt=s.prompt,
            max_tokens=cfg.max_tokens or SYNTHETIC_MAX_TOKENS,
            score=lambda text, answer=s.answer: score_answer(text, answer),
            answer=" " + s.answer,
        )

    def draw(self, n: int, rng: np.random.Generator) -> list[EvalSample]:
        """``n`` prompts: without replacement while the pool allows, else with."""
        idx = rng.choice(self.size, size=n, replace=n > self.size)
        return [self.sample(int(i)) for i in idx]


@lru_cache(maxsize=4096)
def _realtext(kind: str, seed: int, length: int, tokenizer: str, essays: Path | None):
    """A training-seed real-text sample (the pool draws seeds below its size, < 10**7)."""
    from evolve.tasks.realtext import load_tokenizer, make_sample

    return make_sample(kind, seed, length, load_tokenizer(tokenizer), essays_dir=essays)


@lru_cache(maxsize=4096)
def _synthetic(kind: str, seed: int, length: int, count: Callable[[str], int]):
    from evolve.tasks.synthetic import make_sample

    return make_sample(kind, seed, length, count_tokens=count)
