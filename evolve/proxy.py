"""An offline proxy for evolving NAMM on a real model: record each prompt's features once, then
replay thousands of candidates through the engine's own page selection.

Why: on SmolLM2-135M one served generation (16 candidates x 4 real-text prompts of 2k tokens)
takes ~10 min on the 2-core CPU, so the planned 80 generations would take 13 hours. A prompt's
features do not depend on the candidate until it evicts something: recorded once with the full
cache (the HF reference runner, the engine's feature pipeline), each candidate's decisions can
be replayed in about a second, step by step: the scorer on the recorded features of the tokens
it still holds, then :func:`vllm_namm.page_plan.select_pages` (the engine's rule: whole pages,
the weights' page aggregation, the budget as a fraction of the context so far).

Fitness: the share of the asked facts' tokens (the sentences holding a right answer) still
cached after the prompt's last step, averaged over prompts. What it ignores: after an eviction
the engine's later attention renormalises over fewer tokens, and the proxy never generates. So
its champion is only a candidate; the served engine decides (``benchmarks quality``).

``python -m evolve.proxy record``, ``run`` (CMA-ES, ``--resume``) and ``score`` (weights files on
the recordings); see ``evolve/README.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from torch import Tensor

RECORDING_VERSION = 1


# ---------------------------------------------------------------------------------------------
# recording


class _FeatureRecorder:
    """Wraps a NammPolicy in the reference runner: keeps every token and records, per layer view,
    the raw EMA'd spectrogram for each EMA coefficient, the key norms, the cached positions and
    the newest query position."""

    def __init__(self, policy: Any, gammas: list[float], n_layers: int) -> None:
        from vllm_namm.policies.namm import NammFeatureState

        self.policy = policy
        self.gammas = gammas
        feats = policy.features
        self.states = [  # one feature state per (extra gamma, layer); the first gamma's is the runner's
            [NammFeatureState(feats.model_copy(update={"ema_coeff_per_step": g})) for _ in range(n_layers)]
            for g in gammas[1:]
        ]
        self.views = 0
        self.n_layers = n_layers
        self.layers: list[dict] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def score(self, view: Any, state: Any) -> Tensor:
        from vllm_namm.policies.namm import spectral_features

        layer = self.views % self.n_layers
        self.views += 1
        x, bad = self.policy.features_for(view, state)
        bins = self.policy.features.bins
        pos_dims = self.policy.features.pos_dims
        emas = [x[..., pos_dims : pos_dims + bins]]
        for states in self.states:
            emas.append(
                spectral_features(
                    view.attn, view.positions, view.query_positions, view.num_new_tokens, states[layer]
                )[0]
            )
        self.layers.append(
            {
                "ema": {str(g): e.to(torch.float16) for g, e in zip(self.gammas, emas, strict=True)},
                "key_norm": x[..., -1].to(torch.float16),
                "positions": view.positions[0].clone(),
                "newest": int(view.query_positions.max()),
            }
        )
        return torch.zeros(bad.shape)

    def select(self, scores: Tensor, view: Any) -> Tensor:
        return torch.ones_like(scores, dtype=torch.bool)


def fact_token_labels(prompt: str, values: tuple[str, ...], offsets: Tensor) -> Tensor:
    """bool [n_tokens]: tokens of every sentence of ``prompt`` that holds one of ``values``."""
    labels = torch.zeros(len(offsets), dtype=torch.bool)
    for value in values:
        for m in re.finditer(re.escape(value), prompt):
            start = max(prompt.rfind(".", 0, m.start()), prompt.rfind("\n", 0, m.start())) + 1
            end = prompt.find(".", m.end())
            end = len(prompt) if end < 0 else end + 1
            labels |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return labels


def record_prompt(
    model: Any, ids: list[int], labels: Tensor, gammas: list[float], interval: int = 512
) -> dict:
    """One prompt's recording: every eviction step's raw features, full cache, nothing evicted.

    A step: ``ema`` {gamma: [layers, kv, n, bins]}, ``key_norm`` [layers, kv, n] (float16),
    ``positions`` [n], ``newest`` (the newest query position)."""
    from vllm_namm.config import EvictionConfig
    from vllm_namm.policies import NammPolicy
    from vllm_namm.reference import generate
    from vllm_namm.settings import FeatureConfig
    from vllm_namm.weights import NammWeights

    n_layers = model.config.num_hidden_layers
    features = FeatureConfig(ema_coeff_per_step=gammas[0], key_norm=True)
    recorder = _FeatureRecorder(NammPolicy(NammWeights.zeros(features=features)), gammas, n_layers)
    generate(model, None, ids, recorder, 1, EvictionConfig(policy="namm", interval=interval))
    steps = []
    for i in range(0, len(recorder.layers), n_layers):
        group = recorder.layers[i : i + n_layers]
        steps.append(
            {
                "ema": {g: torch.stack([v["ema"][g] for v in group]) for g in group[0]["ema"]},
                "key_norm": torch.stack([v["key_norm"] for v in group]),
                "positions": group[0]["positions"],
                "newest": group[0]["newest"],
            }
        )
    return {"version": RECORDING_VERSION, "labels": labels, "steps": steps}


def recording_interval(n_tokens: int, one_shot: bool) -> int:
    """The reference runner's interval for a recording: n_up (the served default), or for one-shot
    the prompt's length rounded down to the STFT hop (the interval must be a multiple of it), so
    the single step falls up to hop - 1 tokens before the prompt's end (the chat template's
    closing tokens)."""
    from vllm_namm.settings import FeatureConfig

    features = FeatureConfig()
    return max(n_tokens // features.s_w, 1) * features.s_w if one_shot else features.n_up


def record(
    model_dir: Path,
    kinds: list[str],
    lengths: list[int],
    seeds: list[int],
    out: Path,
    gammas: list[float],
    one_shot: bool = False,
) -> list[Path]:
    """Record every (kind, length, seed) real-text prompt not recorded yet (idempotent).

    ``one_shot``: one step after the whole prompt, question included (the served one-shot mode,
    an interval longer than the prompt), instead of one every 512 tokens."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evolve.tasks import realtext

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = None
    paths = []
    jobs = [(k, n, s) for k in kinds for n in lengths for s in seeds]
    for kind, n, seed in tqdm(jobs, desc="recording features", unit="prompt"):
        path = out / f"{kind}-{n}-{seed}.pt"
        paths.append(path)
        if path.exists():
            continue
        if model is None:
            model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        sample = realtext.make_sample(kind, seed, n, tok)
        enc = tok(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
        labels = fact_token_labels(sample.prompt, sample.answers, torch.tensor(enc["offset_mapping"]))
        ids = enc["input_ids"]
        rec = record_prompt(model, ids, labels, gammas, interval=recording_interval(len(ids), one_shot))
        rec.update(kind=kind, seed=seed, target_tokens=n, model=str(model_dir), one_shot=one_shot)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(rec, tmp)
        tmp.replace(path)
    return paths


class ProxyError(ValueError):
    """Recordings that cannot be used; the message names the file and why."""


def load_recordings(paths: list[Path]) -> list[dict]:
    """Recordings from files (``*.pt``) or folders of them, checked for their format version."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.pt")) if p.is_dir() else [p]
    if not files:
        raise ProxyError(f"no recordings (*.pt) in {', '.join(map(str, paths))}")
    recs = []
    for f in files:
        try:
            rec = torch.load(f, weights_only=False)
        except Exception as e:  # a truncated or foreign file: one line, not a traceback
            raise ProxyError(f"{f} cannot be read as a recording ({type(e).__name__}: {e})") from None
        if not isinstance(rec, dict) or rec.get("version") != RECORDING_VERSION:
            raise ProxyError(f"{f} is not a proxy recording of version {RECORDING_VERSION}")
        recs.append(rec)
    one_shot = [str(f) for f, r in zip(files, recs, strict=True) if r.get("one_shot", False)]
    if 0 < len(one_shot) < len(recs):  # one fitness over two schedules would evolve for neither
        raise ProxyError(
            f"recordings mix one-shot ({len(one_shot)}, e.g. {one_shot[0]}) and incremental "
            f"({len(recs) - len(one_shot)}) steps: keep each schedule in its own folder"
        )
    return recs


# ---------------------------------------------------------------------------------------------
# replay


@dataclass
class PreparedPrompt:
    """One recording made ready for one weights file: per step the scorer's input for every
    recorded token (candidate-independent: a token's features do not depend on what else is
    cached), or with ``hidden`` the MLP's last hidden state (then a candidate that changes only
    the output layer scores all tokens with one matrix product)."""

    inputs: list[Tensor]
    """per step [layers * kv, n, dim] float32"""
    positions: list[Tensor]
    newest: list[int]
    labels: Tensor
    rows: tuple[int, int]
    """(layers, kv heads)"""


def _ema_key(rec: dict, gamma: float) -> str:
    keys = rec["steps"][0]["ema"]
    match = [k for k in keys if abs(float(k) - gamma) < 1e-9]
    if not match:
        raise ProxyError(
            f"the weights use EMA {gamma}, recorded: {', '.join(keys)} (record it with --gammas)"
        )
    return match[0]


@torch.no_grad()
def prepare(rec: dict, weights: Any, hidden: bool) -> PreparedPrompt:
    from vllm_namm.features import token_features

    key = _ema_key(rec, weights.features.ema_coeff_per_step)
    scorer = weights.build_scorer()
    inputs, positions, newest = [], [], []
    for step in rec["steps"]:
        ema, kn = step["ema"][key].float(), step["key_norm"].float()
        pos = step["positions"]
        x = token_features(
            ema,
            pos.expand(ema.shape[:3]),
            step["newest"],
            weights.features,
            weights.norm_mean,
            weights.norm_std,
            kn if weights.features.key_norm else None,
        ).flatten(0, 1)
        inputs.append(scorer.hidden_state(x, weights.params) if hidden else x)
        positions.append(pos)
        newest.append(step["newest"])
    layers, kv = rec["steps"][0]["key_norm"].shape[:2]
    return PreparedPrompt(inputs, positions, newest, rec["labels"], (layers, kv))


def budget_page_keep(
    scores: Tensor, positions: Tensor, block_size: int, keep_tokens: int, aggregate: str
) -> Tensor:
    """bool [n]: the tokens :func:`~vllm_namm.page_plan.select_pages` keeps for one layer group's
    scores [rows, n] under the engine's default protection (page 0, the newest token's page), in
    a few tensor operations (``select_pages`` also keeps the statistics the server logs; here only
    the decision is needed, for thousands of replays). ``tests/test_proxy.py`` checks they agree."""
    from vllm_namm.page_plan import budget_pages, token_ranks

    n = positions.numel()
    rank = token_ranks(scores)
    pages, inverse = torch.unique(positions // block_size, return_inverse=True)
    n_pages = pages.numel()
    count = torch.zeros(n_pages, dtype=torch.float64).index_add_(
        0, inverse, torch.ones(n, dtype=torch.float64)
    )
    mean = torch.zeros(n_pages, dtype=torch.float64).index_add_(0, inverse, rank.sum(0).double())
    mean = mean / max(n - 1, 1) / (count * rank.shape[0])
    if aggregate == "mean":
        primary, secondary = mean, torch.zeros_like(mean)
    elif aggregate == "max":
        best = rank.amax(0).double() / max(n - 1, 1)
        primary = torch.zeros(n_pages, dtype=torch.float64).scatter_reduce_(0, inverse, best, "amax")
        secondary = mean
    else:
        raise ValueError(f"the proxy replays page scores max and mean, not {aggregate!r}")
    order = torch.argsort(secondary, stable=True)
    order = order[torch.argsort(primary[order], stable=True)]
    protected = (pages >= int(positions.max()) // block_size) | (pages == 0)
    slots = max(budget_pages(keep_tokens, block_size) - int(protected.sum()), 0)
    best_first = order.flip(0)
    keep = protected.clone()
    keep[best_first[~protected[best_first]][:slots]] = True
    return keep[inverse]


@torch.no_grad()
def replay(
    p: PreparedPrompt, scores_of: Any, page_score: str, budget_ratio: float, block_size: int
) -> tuple[float, float]:
    """(share of fact tokens kept after the last step, share of the prompt kept) for one prompt.

    ``scores_of(inputs, idx)``: scores [rows, len(idx)] of the cached tokens ``idx`` from a step's
    ``inputs``."""
    from vllm_namm.settings import BudgetConfig

    budget = BudgetConfig(ratio=budget_ratio)
    kept = torch.zeros(0, dtype=torch.bool)
    for inputs, positions, newest in zip(p.inputs, p.positions, p.newest, strict=True):
        kept = torch.cat([kept, torch.ones(positions.numel() - kept.numel(), dtype=torch.bool)])
        idx = torch.nonzero(kept)[:, 0]
        keep = budget_page_keep(
            scores_of(inputs, idx),
            positions[idx],
            block_size,
            budget.size(idx.numel(), newest + 1),
            page_score,
        )
        kept[idx[~keep]] = False
    labels = p.labels[: kept.numel()]
    fact = float(kept[labels].float().mean()) if bool(labels.any()) else 1.0
    return fact, float(kept.float().mean())


class ProxyScorer:
    """Scores candidates of one weights file on prepared recordings.

    ``output_only``: candidates differ from the file in the MLP's output layer alone (prepared
    once as hidden states); otherwise every candidate runs the whole scorer on the cached tokens
    (BAM's scores depend on which tokens are cached)."""

    def __init__(
        self, recs: list[dict], weights: Any, budget_ratio: float, block_size: int, output_only: bool
    ):
        self.weights = weights
        self.scorer = weights.build_scorer()
        self.fast = output_only and weights.scorer.kind == "mlp"
        self.prepared = [prepare(r, weights, hidden=self.fast) for r in recs]
        self.page_score = weights.page_score or "max"
        self.budget_ratio, self.block_size = budget_ratio, block_size

    def __call__(self, params: Tensor | None = None) -> dict[str, float]:
        flat = self.weights.params if params is None else params.to(torch.float32)
        if self.fast:
            w_s, b_s = self.scorer.layers(flat)[-1]
            w, b = w_s[:, 0], (0.0 if b_s is None else b_s[0])

            def scores_of(inputs: Tensor, idx: Tensor) -> Tensor:
                return (inputs @ w)[:, idx] + b
        else:

            def scores_of(inputs: Tensor, idx: Tensor) -> Tensor:
                return self.scorer.forward(inputs[:, idx], flat)

        outs = [
            replay(p, scores_of, self.page_score, self.budget_ratio, self.block_size) for p in self.prepared
        ]
        return {
            "fact_kept": float(np.mean([o[0] for o in outs])),
            "all_facts": float(np.mean([o[0] >= 1.0 for o in outs])),
            "retained": float(np.mean([o[1] for o in outs])),
        }


# ---------------------------------------------------------------------------------------------
# CMA-ES against the proxy (the caller-owned ask/tell loop, checkpointed every generation)


_WORKER_PROXY: ProxyScorer | None = None


def _worker_fact_kept(params: np.ndarray) -> float:
    assert _WORKER_PROXY is not None
    return _WORKER_PROXY(torch.tensor(params, dtype=torch.float32))["fact_kept"]


def run(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from evolve.config import CMAConfig, ExtraParamsConfig
    from evolve.params import ParamSpace
    from evolve.plot import plot_history
    from evolve.strategy import Strategy
    from vllm_namm.shipped_weights import resolve_weights
    from vllm_namm.weights import load_weights

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    start = load_weights(resolve_weights(a.weights))
    space = ParamSpace(start, ExtraParamsConfig(scorer_layers=a.layers))
    output_only = a.layers == "output"
    train_recs, valid_recs = load_recordings(a.train), load_recordings(a.valid)
    one_shot = bool(train_recs[0].get("one_shot", False))
    if bool(valid_recs[0].get("one_shot", False)) != one_shot:
        raise ProxyError("--train and --valid recordings differ in schedule (one-shot against incremental)")
    train, valid = (
        ProxyScorer(recs, start, a.budget_ratio, a.block_size, output_only)
        for recs in (train_recs, valid_recs)
    )

    def fit(proxy: ProxyScorer, x: np.ndarray) -> dict[str, float]:
        return proxy(torch.tensor(space.split(x)[0], dtype=torch.float32))

    global _WORKER_PROXY
    _WORKER_PROXY = train  # forked workers inherit the prepared recordings (copy-on-write)
    pool = mp.get_context("fork").Pool(a.workers, initializer=torch.set_num_threads, initargs=(1,))

    ckpt = out / "checkpoint.pkl"
    command = " ".join(["python -m evolve.proxy", *a.argv])  # the first run's, kept on --resume
    if a.resume and ckpt.exists():
        state = pickle.loads(ckpt.read_bytes())
        strategy, history = Strategy.from_state_dict(state["strategy"]), state["history"]
        command = state.get("command", command)
    else:
        cma = CMAConfig(
            popsize=a.popsize, sigma0=a.sigma, seed=a.seed, options={"CMA_diagonal": space.dim > 100}
        )
        strategy, history = Strategy(space.x0(), cma), []
        x0 = space.x0()
        history.append({"generation": -1, "train": fit(train, x0), "valid": fit(valid, x0), "x": x0.tolist()})
    bar = tqdm(total=a.generations, initial=strategy.generation, desc="proxy evolve", unit="gen")
    while strategy.generation < a.generations:
        t0 = time.time()
        cands = strategy.ask()
        fits = pool.map(_worker_fact_kept, [space.split(x)[0] for x in cands])
        strategy.tell(fits)
        mean = strategy.mean
        row: dict[str, Any] = {
            "generation": strategy.generation - 1,
            "best": max(fits),
            "pop_mean": float(np.mean(fits)),
            "sigma": strategy.sigma,
            "x": mean.tolist(),
        }
        if strategy.generation % a.eval_every == 0 or strategy.generation == a.generations:
            row["train"], row["valid"] = fit(train, mean), fit(valid, mean)
        row["seconds"] = time.time() - t0
        history.append(row)
        state = {"strategy": strategy.state_dict(), "history": history, "command": command}
        ckpt.write_bytes(pickle.dumps(state))
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "x"}) + "\n")
        bar.update(1)
        bar.set_postfix(best=f"{row['best']:.3f}", pop_mean=f"{row['pop_mean']:.3f}")
    bar.close()
    pool.close()
    # the export: the evaluated CMA mean keeping the most fact tokens over every recorded prompt
    # (a small validation set alone swings by +-0.05 between neighbouring generations)
    n_train, n_valid = len(train.prepared), len(valid.prepared)

    def overall(h: dict) -> float:
        return (n_train * h["train"]["fact_kept"] + n_valid * h["valid"]["fact_kept"]) / (n_train + n_valid)

    best = max((h for h in history if "valid" in h), key=overall)
    plot_history(
        [
            {
                "global_generation": h["generation"],
                "stage": 0,
                "best": h["best"],
                "mean": h["pop_mean"],
                "mean_candidate": overall(h) if "valid" in h else None,
                "retained_fraction": h["train"]["retained"] if "train" in h else None,
            }
            for h in history[1:]  # [0] is the start point, scored only
        ],
        out / "curve.png",
        ylabel="share of the asked facts' tokens kept (proxy)",
    )
    path = space.export(
        out / "best.safetensors",
        np.array(best["x"]),
        base_model=str(a.model) if a.model else None,
        stages=[f"proxy:{len(train.prepared)} train / {len(valid.prepared)} validation recordings"],
        generations=best["generation"] + 1,
        fitness=overall(best),
        retained_fraction=best["valid"]["retained"],
        mode=f"{'one-shot ' if one_shot else ''}budget {a.budget_ratio}",  # one-shot: serve with an interval > the prompt
        fitness_kind="proxy: share of the asked facts' tokens kept, over the training and validation recordings",
        command=command,
        budget_ratio=a.budget_ratio,
        description=(
            f"evolved with python -m evolve.proxy (CMA-ES against recorded features, population "
            f"{strategy.popsize}; the CMA mean of generation {best['generation']}, "
            f"{'output layer' if output_only else 'every parameter'} searched from {a.weights})"
        ),
    )
    print(
        f"exported generation {best['generation']} (CMA mean): validation fact kept "
        f"{best['valid']['fact_kept']:.3f} (start {history[0]['valid']['fact_kept']:.3f}), train "
        f"{best['train']['fact_kept']:.3f} (start {history[0]['train']['fact_kept']:.3f}) -> {path}"
    )
    return 0


def score(a: argparse.Namespace) -> int:
    from vllm_namm.shipped_weights import resolve_weights
    from vllm_namm.weights import load_weights

    recs = load_recordings(a.recordings)
    print(f"{len(recs)} recordings, budget {a.budget_ratio}, block {a.block_size}")
    print("| weights | fact tokens kept | prompts keeping every fact token | retained |")
    print("|---|---:|---:|---:|")
    for name in a.weights:
        proxy = ProxyScorer(recs, load_weights(resolve_weights(name)), a.budget_ratio, a.block_size, True)
        f = proxy()
        print(f"| {name} | {f['fact_kept']:.3f} | {f['all_facts']:.3f} | {f['retained']:.3f} |")
    return 0


def first_bin_start(
    base: Any, ema_per_step: float, page_score: str, base_name: str, command: str | None = None
) -> Any:
    """A start for the one-shot step from ``base`` (its scorer shape and feature statistics): every
    parameter 0 but the output weight of the spectrogram's first bin, so a token scores its
    normalised EMA'd attention energy. With a short EMA (0.95 per query: the question's frames)
    that is SnapKV's signal in NAMM's inputs; CMA-ES goes on from there (the study's section 1)."""
    import dataclasses

    from vllm_namm.weights import Provenance

    scorer = base.build_scorer()
    flat = torch.zeros_like(base.params)
    w_out, _ = scorer.layers(flat)[-1]  # a view into flat; the MLP's residual passes the inputs on
    w_out[base.features.pos_dims, 0] = 1.0
    old = base.provenance or Provenance()
    return dataclasses.replace(
        base,
        features=base.features.model_copy(update={"ema_coeff_per_step": ema_per_step}),
        params=flat,
        threshold=0.0,
        page_score=page_score,
        provenance=Provenance(
            description=f"one-shot start: the normalised first spectrogram bin (EMA {ema_per_step}/query), "
            f"{page_score} page scores, on the feature statistics of {base_name}",
            base_model=old.base_model,
            stages=["hand:first-bin"],
            command=command,
            model_shape=old.model_shape,
        ),
    )


def start(a: argparse.Namespace) -> int:
    from evolve.command import command_line
    from vllm_namm.weights import describe, load_weights, save_weights

    base = load_weights(a.base)
    if not 0.0 < a.ema < 1.0:
        raise ProxyError(f"--ema {a.ema}: an EMA coefficient per query lies strictly between 0 and 1")
    if base.scorer.kind != "mlp":
        raise ProxyError(f"--base {a.base} is a {base.scorer.kind} scorer; the first-bin start needs an MLP")
    weights = first_bin_start(
        base, a.ema, a.page_score, str(a.base), command_line("python -m evolve.proxy", a.argv)
    )
    save_weights(a.out, weights)
    print(describe(weights))
    print(f"wrote {a.out}")
    return 0


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]


def main(argv: list[str] | None = None) -> int:
    from evolve.tasks.realtext import REALTEXT_KINDS
    from vllm_namm.settings import PageScore

    p = argparse.ArgumentParser(prog="python -m evolve.proxy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record real-text prompts' features with the full cache")
    r.add_argument("--model", type=Path, default=Path("models/smollm2-135m-instruct"))
    r.add_argument("--kinds", nargs="+", default=list(REALTEXT_KINDS))
    r.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    r.add_argument("--seeds", type=_seeds, default=_seeds("0-1"), help="training seeds, e.g. 0-3")
    r.add_argument(
        "--gammas", type=float, nargs="+", default=[0.99, 0.999], help="EMA coefficients per step to record"
    )
    r.add_argument(
        "--one-shot",
        action="store_true",
        help="one step after the whole prompt, question included (as a server whose interval exceeds the prompt)",
    )
    r.add_argument("--out", type=Path, required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--budget-ratio", type=float, default=0.25)
    common.add_argument("--block-size", type=int, default=32, help="the served --block-size (a page)")
    e = sub.add_parser("run", parents=[common], help="CMA-ES against the recordings")
    e.add_argument("--weights", default="l2-smollm2", help="start weights (file or shipped name)")
    e.add_argument("--train", type=Path, nargs="+", required=True)
    e.add_argument("--valid", type=Path, nargs="+", required=True, help="recordings that choose the export")
    e.add_argument("--layers", choices=["output", "all"], default="output")
    e.add_argument("--generations", type=int, default=60)
    e.add_argument("--popsize", type=int, default=16)
    e.add_argument("--sigma", type=float, default=0.2)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--model", type=Path, default=None, help="the recorded model (provenance)")
    e.add_argument("--resume", action="store_true")
    e.add_argument("--workers", type=int, default=2, help="processes scoring candidates")
    e.add_argument(
        "--eval-every", type=int, default=4, help="score the CMA mean on both sets every N generations"
    )
    e.add_argument("--out", type=Path, required=True)
    st = sub.add_parser("start", help="a one-shot start: a weights file reduced to its first spectrogram bin")
    st.add_argument("--base", default="l2-smollm2", help="weights file or shipped name (an MLP)")
    st.add_argument(
        "--ema", type=float, default=0.95, help="EMA coefficient per query (recorded with --gammas)"
    )
    st.add_argument("--page-score", choices=get_args(PageScore), default="max")
    st.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("score", parents=[common], help="weights files' proxy fitness on recordings")
    s.add_argument("--recordings", type=Path, nargs="+", required=True)
    s.add_argument("--weights", nargs="+", required=True)
    a = p.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else list(argv)
    from evolve.assets import AssetError, check_model_dir
    from vllm_namm.weights import WeightsError

    try:
        if a.cmd == "record":
            check_model_dir(a.model)
            record(a.model, a.kinds, a.lengths, a.seeds, a.out, a.gammas, a.one_shot)
            return 0
        return {"run": run, "start": start, "score": score}[a.cmd](a)
    except (ProxyError, AssetError, WeightsError) as e:
        print(f"evolve.proxy: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
