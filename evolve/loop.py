"""The evolution loop: stages × generations of CMA-ES ask → evaluate on the server → tell.

Each generation sends every (candidate, prompt) pair — population plus the CMA mean —
and the missing full-cache baselines as one batch of concurrent requests; every
request carries its candidate's full parameter vector, so the server keeps no
per-candidate state (restarts and concurrent runs are harmless).

Run directory (``out_dir``)::

    config.json            resolved config of the run
    checkpoint.pkl         CMA state + numpy RNG + history + stage index (rewritten every generation)
    log.jsonl              one line per generation (rewritten from the checkpoint on --resume)
    curve.png              training curve
    baseline_cache.json    full-cache completions (default location)
    stage<k>_best.safetensors, best.safetensors   exported best means (``--namm-weights`` files)
    summary.json           final result
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from evolve.baseline import BaselineCache
from evolve.client import GenerationResult, gather_or_cancel
from evolve.config import ConfigError, EvolveConfig, StageConfig
from evolve.fitness import FitnessResult, SampleOutcome, compute_fitness
from evolve.params import ParamSpace
from evolve.samples import EvalSample, TaskPool, generation_rng
from evolve.strategy import Strategy

log = logging.getLogger("evolve")

CHECKPOINT = "checkpoint.pkl"
LOG = "log.jsonl"
CURVE = "curve.png"
CONFIG = "config.json"
SUMMARY = "summary.json"
BEST = "best.safetensors"
CHECKPOINT_VERSION = 1
NONE_XARGS = {"kv_eviction": "none"}


class GenerationFailedError(RuntimeError):
    """No candidate of a generation could be scored (the checkpoint of the previous one is intact)."""


class Client(Protocol):
    """What the loop needs from a server client (``EvalClient``, or a fake in tests)."""

    async def check(self) -> str: ...

    async def complete(
        self, prompt: str, max_tokens: int, xargs: dict[str, Any], temperature: float = 0.0
    ) -> GenerationResult: ...

    async def truncate_middle(self, prompt: str, max_tokens: int) -> str: ...

    async def answer_logprob(self, prompt: str, answer: str, xargs: dict[str, Any]) -> GenerationResult: ...


@dataclass
class RunState:
    """Everything a checkpoint holds."""

    stage: int
    gens_done: int  # completed generations of the current stage
    strategy: Strategy
    history: list[dict[str, Any]] = field(default_factory=list)
    best_mean: dict[str, Any] | None = None  # current stage: x, fitness, retained_fraction, generation
    stage_results: dict[int, dict[str, Any]] = field(default_factory=dict)

    def save(self, path: Path, identity: dict[str, Any]) -> None:
        blob = {
            "version": CHECKPOINT_VERSION,
            "identity": identity,
            "stage": self.stage,
            "gens_done": self.gens_done,
            "strategy": self.strategy.state_dict(),
            "history": self.history,
            "best_mean": self.best_mean,
            "stage_results": self.stage_results,
        }
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> tuple[RunState, dict[str, Any]]:
        path = Path(path)
        with path.open("rb") as f:
            blob = pickle.load(f)
        if blob.get("version") != CHECKPOINT_VERSION:
            raise ConfigError(
                f"{path}: checkpoint version {blob.get('version')!r}, expected {CHECKPOINT_VERSION}"
            )
        state = cls(
            stage=blob["stage"],
            gens_done=blob["gens_done"],
            strategy=Strategy.from_state_dict(blob["strategy"]),
            history=blob["history"],
            best_mean=blob["best_mean"],
            stage_results=blob["stage_results"],
        )
        return state, blob["identity"]


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"stage{index + 1}:" + "+".join(t.name for t in stage.tasks)


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


class Evolution:
    """One run. ``await run()`` executes (or resumes) it to the end of the last stage."""

    def __init__(
        self, cfg: EvolveConfig, client: Client, *, resume: bool = False, progress: bool = True
    ) -> None:
        if cfg.start_weights is None:
            from vllm_namm.policies import DEFAULT_WEIGHTS as shipped

            log.info(
                "start_weights not set: using the shipped default %s (what `vllm serve` loads without "
                "--namm-weights)",
                shipped,
            )
            cfg = cfg.model_copy(update={"start_weights": shipped})
        self.cfg = cfg
        self.client = client
        self.resume = resume
        self.progress = progress
        self.command = " ".join(["python -m evolve", *sys.argv[1:]])
        self.out = Path(cfg.out_dir)
        self.space = ParamSpace.from_file(cfg.start_weights, cfg.extra_params)
        self.model = ""
        self._pools: dict[int, list[TaskPool]] = {}
        self._truncated: dict[str, str] = {}
        self._count_tokens = _token_counter(cfg.synthetic_tokenizer)

    # -- set-up ---------------------------------------------------------------------------------------

    def _init_state(self) -> RunState:
        ckpt = self.out / CHECKPOINT
        if self.resume:
            if not ckpt.is_file():
                raise ConfigError(f"--resume: no checkpoint at {ckpt}")
            state, identity = RunState.load(ckpt)
            diff = _diff_keys(identity, self.cfg.identity())
            if diff:
                raise ConfigError(
                    f"--resume: the config differs from the checkpointed run in {diff}; only server.*, out_dir, "
                    "baseline_cache and stages[*].generations may change"
                )
            if state.strategy.es.N != self.space.dim:
                raise ConfigError(
                    f"--resume: checkpoint has {state.strategy.es.N} parameters, start_weights "
                    f"{self.space.dim}"
                )
            done_stage = self.cfg.stages[state.stage]
            for i in range(state.stage):
                done = sum(1 for h in state.history if h["stage"] == i)
                if self.cfg.stages[i].generations != done:
                    raise ConfigError(
                        f"--resume: stage {i} already finished after {done} generations; "
                        f"stages.{i}.generations cannot change to {self.cfg.stages[i].generations}"
                    )
            if state.gens_done > done_stage.generations:
                raise ConfigError(
                    f"--resume: stage {state.stage} has run {state.gens_done} generations, more than "
                    f"stages.{state.stage}.generations={done_stage.generations}"
                )
            log.info(
                "resuming at stage %d after %d generations (%d in total)",
                state.stage,
                state.gens_done,
                len(state.history),
            )
            return state
        if ckpt.exists():
            raise ConfigError(f"{ckpt} exists: pass --resume to continue that run, or choose another --out")
        return RunState(
            stage=0, gens_done=0, strategy=self._new_strategy(0, self.space.x0(self.cfg.x0 == "zeros"))
        )

    def _new_strategy(self, stage: int, x0: np.ndarray) -> Strategy:
        return Strategy(x0, self.cfg.cma, sigma0=self.cfg.stages[stage].sigma0)

    def pools(self, stage: int) -> list[TaskPool]:
        if stage not in self._pools:
            self._pools[stage] = [TaskPool(t, self._count_tokens) for t in self.cfg.stages[stage].tasks]
        return self._pools[stage]

    # -- one generation -------------------------------------------------------------------------------

    def draw_samples(self, stage: int, generation: int) -> list[EvalSample]:
        out: list[EvalSample] = []
        for ti, pool in enumerate(self.pools(stage)):
            out += pool.draw(
                self.cfg.samples_per_task, generation_rng(self.cfg.cma.seed, stage, generation, ti)
            )
        return out

    async def _prepare(self, samples: list[EvalSample]) -> list[EvalSample]:
        out = []
        for s in samples:
            if s.truncate_to is not None:
                if s.key not in self._truncated:
                    self._truncated[s.key] = await self.client.truncate_middle(s.prompt, s.truncate_to)
                s = EvalSample(
                    task=s.task,
                    key=s.key,
                    prompt=self._truncated[s.key],
                    max_tokens=s.max_tokens,
                    score=s.score,
                )
            out.append(s)
        return out

    def _provenance(self) -> dict[str, Any]:
        ratio = self.cfg.budget_ratio
        return {
            "mode": "threshold" if ratio is None else f"budget ratio {ratio:g}",
            "fitness_kind": self.cfg.fitness,
            "command": self.command,
            "budget_ratio": ratio,
        }

    def candidate_xargs(self, x: np.ndarray) -> dict[str, Any]:
        """A candidate's per-request settings: its parameters, and the memory budget if ranked under one."""
        xargs = self.space.xargs(x)
        if self.cfg.budget_ratio is not None:
            xargs["kv_eviction_ratio"] = self.cfg.budget_ratio
        return xargs

    def _job(self, s: EvalSample, xargs: dict[str, Any]):
        if self.cfg.fitness == "loglik":
            if s.answer is None:
                raise ConfigError(f"fitness loglik needs a reference answer; task {s.task} has none")
            return self.client.answer_logprob(s.prompt, s.answer, xargs)
        return self.client.complete(s.prompt, s.max_tokens, xargs, self.cfg.temperature)

    def _cache_key(self, s: EvalSample) -> tuple[str, int]:
        """(prompt, max_tokens) under which the baseline is cached; log-likelihoods get their own keys."""
        if self.cfg.fitness == "loglik":
            return f"{s.prompt}\x00loglik\x00{s.answer}", 0
        return s.prompt, s.max_tokens

    def _score(self, s: EvalSample, text: str) -> float:
        """exact_match: the task metric; loglik: exp(mean log-prob per answer token), in (0, 1]."""
        if self.cfg.fitness == "loglik":
            return math.exp(float(text))
        return s.score(text)

    async def run_generation(self, state: RunState, cache: BaselineCache) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.monotonic()
        xs = state.strategy.ask()
        evals = xs + ([state.strategy.mean] if cfg.evaluate_mean else [])
        if cfg.evaluate_start:
            evals.append(state.strategy.start)
        samples = await self._prepare(self.draw_samples(state.stage, state.gens_done))
        temp = cfg.temperature
        missing: dict[str, EvalSample] = {}
        for s in samples:
            if cache.get(self.model, *self._cache_key(s), temp) is None:
                missing.setdefault(s.key, s)
        base_jobs = [self._job(s, NONE_XARGS) for s in missing.values()]
        cand_xargs = [self.candidate_xargs(x) for x in evals]
        cand_jobs = [self._job(s, xa) for xa in cand_xargs for s in samples]
        results = await gather_or_cancel(base_jobs + cand_jobs)
        base_results, cand_results = results[: len(base_jobs)], results[len(base_jobs) :]
        for s, r in zip(missing.values(), base_results, strict=True):
            if r.ok and r.text is not None:
                cache.put(self.model, *self._cache_key(s), r.text, temp)
        cache.save()
        req_failed = sum(not r.ok for r in results)
        if req_failed:
            log.warning(
                "generation %d: %d of %d requests failed after retries (counted, not scored 0)",
                len(state.history),
                req_failed,
                len(results),
            )
        base_failed = sum(not r.ok for r in base_results)
        if base_failed:
            log.warning(
                "%d of %d full-cache baseline requests failed; those prompts are dropped this generation",
                base_failed,
                len(base_results),
            )
        base_score: dict[str, float | None] = {}
        for s in samples:
            text = cache.get(self.model, *self._cache_key(s), temp)
            base_score[s.key] = None if text is None else self._score(s, text)

        n = len(samples)
        fits: list[FitnessResult] = []
        for ci in range(len(evals)):
            outs = []
            for s, r in zip(samples, cand_results[ci * n : (ci + 1) * n], strict=True):
                cand = self._score(s, r.text) if r.ok and r.text is not None else None
                outs.append(SampleOutcome(s.task, cand, base_score[s.key], r.retained_fraction))
            fits.append(compute_fitness(outs, cfg.retained_penalty))
        pop = fits[: len(xs)]
        mean_fit = fits[len(xs)] if cfg.evaluate_mean else None
        start_fit = fits[-1] if cfg.evaluate_start else None
        # what the export ranks by: raw fitness, or the advantage over the start point (paired)
        mean_rank = None if mean_fit is None else mean_fit.fitness
        if mean_rank is not None and start_fit is not None:
            mean_rank = None if start_fit.fitness is None else mean_rank - start_fit.fitness

        values, bad = [], []
        for i, f in enumerate(pop):
            ok_frac = f.samples / n if n else 0.0
            if f.fitness is None or ok_frac < cfg.min_success_fraction:
                bad.append(i)
                values.append(None)
            else:
                values.append(f.fitness)
        good = [v for v in values if v is not None]
        if not good:
            await self.client.check()  # a dead server is the likely cause: say so (ServerUnreachableError)
            raise GenerationFailedError(
                f"every candidate of generation {len(state.history)} failed (requests failing or no "
                "baseline): see the warnings above; the run can --resume from the last checkpoint"
            )
        if bad:
            log.warning(
                "%d candidate(s) had fewer than %.0f%% usable prompts and get the generation's worst "
                "fitness: %s",
                len(bad),
                100 * cfg.min_success_fraction,
                bad,
            )
        worst = min(good)
        fitness = [worst if v is None else v for v in values]
        state.strategy.tell(fitness)

        if mean_fit is not None and mean_rank is not None:
            best = state.best_mean
            prev = None if best is None else best.get("rank", best["fitness"])  # older checkpoints: no rank
            if prev is None or mean_rank > prev:
                state.best_mean = {
                    "x": evals[len(xs)].tolist(),
                    "fitness": mean_fit.fitness,
                    "rank": mean_rank,
                    "retained_fraction": mean_fit.retained_fraction,
                    "generation": state.gens_done,
                }
        elif not cfg.evaluate_mean:
            state.best_mean = {
                "x": state.strategy.mean.tolist(),
                "fitness": None,
                "retained_fraction": None,
                "generation": state.gens_done + 1,
            }

        best_i = int(np.argmax(fitness))
        kept = [f.retained_fraction for f in pop if f.retained_fraction is not None]
        record = {
            "stage": state.stage,
            "stage_name": stage_name(self.cfg.stages[state.stage], state.stage),
            "generation": state.gens_done,
            "global_generation": len(state.history),
            "fitness": fitness,
            "best": max(fitness),
            "mean": float(np.mean(fitness)),
            "median": float(np.median(fitness)),
            "retained_fraction": float(np.mean(kept)) if kept else None,
            "mean_candidate": None if mean_fit is None else mean_fit.fitness,
            "mean_candidate_retained_fraction": None if mean_fit is None else mean_fit.retained_fraction,
            "start_candidate": None if start_fit is None else start_fit.fitness,
            "mean_advantage": None if start_fit is None else mean_rank,
            "best_tasks": pop[best_i].model_dump(include={"tasks", "excluded", "mode"}),
            "mean_tasks": None
            if mean_fit is None
            else mean_fit.model_dump(include={"tasks", "excluded", "mode"}),
            "failed_requests": req_failed,
            "failed_candidates": bad,
            "baseline_requests": len(base_jobs),
            "requests": len(results),
            "sigma": state.strategy.sigma,
            "seconds": round(time.monotonic() - t0, 3),
        }
        return record

    # -- driver ---------------------------------------------------------------------------------------

    def _export_stage(self, state: RunState) -> dict[str, Any]:
        st = state.stage
        bm = state.best_mean or {
            "x": state.strategy.mean.tolist(),
            "fitness": None,
            "retained_fraction": None,
            "generation": state.gens_done,
        }
        names = [stage_name(s, i) for i, s in enumerate(self.cfg.stages[: st + 1])]
        path = self.space.export(
            self.out / f"stage{st + 1}_best.safetensors",
            np.asarray(bm["x"]),
            base_model=self.model,
            stages=names,
            generations=len(state.history),
            fitness=bm["fitness"],
            retained_fraction=bm["retained_fraction"],
            **self._provenance(),
        )
        res = {
            "stage": st,
            "name": names[-1],
            "weights": str(path),
            "fitness": bm["fitness"],
            "advantage_over_start": bm.get("rank") if self.cfg.evaluate_start else None,
            "retained_fraction": bm["retained_fraction"],
            "generation": bm["generation"],
            "x": bm["x"],
        }
        state.stage_results[st] = res
        return res

    def _write_log(self, history: list[dict[str, Any]]) -> None:
        tmp = self.out / (LOG + ".tmp")
        with tmp.open("w") as f:
            for h in history:
                f.write(json.dumps(h) + "\n")
        os.replace(tmp, self.out / LOG)

    async def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        from evolve.plot import plot_history

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = await self.client.check()
        state = self._init_state()
        (self.out / CONFIG).write_text(cfg.model_dump_json(indent=2))
        identity = cfg.identity()
        if self.resume:
            self._write_log(state.history)  # the checkpoint is authoritative
        else:
            (self.out / LOG).write_text("")
            state.save(self.out / CHECKPOINT, identity)
        cache = BaselineCache(cfg.baseline_cache_path)
        total = sum(s.generations for s in cfg.stages)
        bar = tqdm(
            total=total,
            initial=len(state.history),
            disable=not self.progress,
            desc="evolve",
            dynamic_ncols=True,
        )
        try:
            while True:
                stage = cfg.stages[state.stage]
                if state.gens_done >= stage.generations:
                    res = self._export_stage(state)
                    if state.stage + 1 >= len(cfg.stages):
                        state.save(self.out / CHECKPOINT, identity)
                        break
                    state = RunState(
                        stage=state.stage + 1,
                        gens_done=0,
                        strategy=self._new_strategy(state.stage + 1, np.asarray(res["x"])),
                        history=state.history,
                        stage_results=state.stage_results,
                    )
                    state.save(self.out / CHECKPOINT, identity)
                    continue
                record = await self.run_generation(state, cache)
                state.history.append(record)
                state.gens_done += 1
                with (self.out / LOG).open("a") as f:
                    f.write(json.dumps(record) + "\n")
                state.save(self.out / CHECKPOINT, identity)
                plot_history(state.history, self.out / CURVE)
                bar.set_postfix(
                    stage=state.stage + 1,
                    best=f"{record['best']:.3f}",
                    mean=f"{record['mean']:.3f}",
                    kept=_fmt(record["retained_fraction"]),
                    cmean=_fmt(record["mean_candidate"]),
                )
                bar.update(1)
        finally:
            bar.close()
        final = state.stage_results[state.stage]
        best = self.space.export(
            self.out / BEST,
            np.asarray(final["x"]),
            base_model=self.model,
            stages=[stage_name(s, i) for i, s in enumerate(cfg.stages)],
            generations=len(state.history),
            fitness=final["fitness"],
            retained_fraction=final["retained_fraction"],
            **self._provenance(),
        )
        summary = {
            "weights": str(best),
            "model": self.model,
            "generations": len(state.history),
            "fitness": final["fitness"],
            "retained_fraction": final["retained_fraction"],
            "stages": [
                {k: v for k, v in r.items() if k != "x"} for _, r in sorted(state.stage_results.items())
            ],
        }
        (self.out / SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _token_counter(tokenizer: str | None):
    if tokenizer is None:
        return len
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    return count
