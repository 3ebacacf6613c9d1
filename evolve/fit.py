"""A NAMM scorer fitted offline to the features: a starting point for CMA-ES that is not noise.

Why: CMA-ES around a random or hand-set vector spends its first generations finding the
direction in which scores mean anything. A linear fit of NAMM's own 25 features (8 oldness +
17 spectrogram bins) to "this token belongs to the fact the question asks for" gives that
direction in a minute. The fit is written as a weights file of the chosen scorer kind whose
hidden layers are zero (so it computes exactly the linear score: BAM passes its input through,
the residual MLP too) and CMA-ES starts from it (``start_weights``, ``x0: weights``).

``--key-norm`` adds the cached key's L2 norm as a 26th feature, and ``--target page`` (the
default) fits what the engine selects: whole pages, scored by their best token. A page is
positive when it holds a token of the fact; its logit is the log-sum-exp (a smooth max) of its
tokens' linear scores, so the fit finds the tokens that *mark* a fact page, not only the
features the fact's average token has (multiple-instance logistic regression).

Recording (nothing is evicted while recording): the HF reference runner runs each training
prompt with a NAMM policy whose selection keeps everything and which records, at every step,
each cached token's features; labels are 1 for the tokens of the asked fact's sentence, 0
for the rest; steps before the fact is cached are skipped. Normalisation statistics are
computed from the same recordings and stored with the weights (the fit sees normalised
spectrograms, as the scorer will). Only training seeds (< 10**7) are used; the held-out AUC
is reported on seeds >= 10**9, which evolution and the quality benchmark use for evaluation.

``python -m evolve.fit --model benchmarks/models/namm-tiny-llama --out runs/fit/x0.safetensors``
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

HELD_OUT = 10**9


def fact_span(sample) -> tuple[int, int]:
    """Character span of the sentence holding the answer (the fact the question asks for)."""
    from evolve.tasks.synthetic import FACT_FORMATS

    if sample.kind == "passkey":
        needle = f"The pass key is {sample.answer}. Remember it. {sample.answer} is the pass key. "
    else:
        key = next(k for k, v in sample.facts if v == sample.answer)
        needle = FACT_FORMATS[sample.kind][0](key, sample.answer)
    start = sample.prompt.index(needle)
    return start, start + len(needle)


class Recording(NamedTuple):
    """Token-steps of the recorded prompts: features, labels and the page each belongs to."""

    x: Tensor
    """[N, input_dim] features (raw, unnormalised spectrogram / key norm)."""
    y: Tensor
    """[N] 1.0 for a token of the asked fact's sentence."""
    page: Tensor
    """[N] int64: one id per (prompt, step, KV head, page of ``page_size`` positions)."""


class _Recorder:
    """Wraps a NammPolicy: records (features, positions) per layer and step; evicts nothing."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.steps: list[tuple[Tensor, Tensor]] = []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def prepare(self, view, state):
        x, bad = self.policy.features_for(view, state)
        self.steps.append((x.detach().clone(), view.positions[0].clone()))
        return x, bad, None

    def score(self, view, state):
        x, bad, _ = self.prepare(view, state)
        return torch.zeros(bad.shape)

    def select(self, scores, view):
        return torch.ones_like(scores, dtype=torch.bool)


def record(
    model,
    tok,
    kinds: list[str],
    lengths: list[int],
    seeds: list[int],
    gamma_per_step: float,
    pos_dims: int = 8,
    key_norm: bool = False,
    page_size: int = 32,
) -> Recording:
    """Features (raw spectrograms), labels and page ids over every step after the fact is cached."""
    from tqdm import tqdm

    from evolve.tasks.synthetic import make_sample
    from vllm_namm.config import EvictionConfig, FeatureConfig
    from vllm_namm.policies import NammPolicy
    from vllm_namm.reference import generate
    from vllm_namm.weights import NammWeights

    feats = FeatureConfig(ema_coeff_per_step=gamma_per_step, pos_dims=pos_dims, key_norm=key_norm)
    raw = NammWeights.zeros(features=feats)  # identity statistics: records the raw spectrogram
    xs, ys, pages = [], [], []
    next_page = 0
    jobs = [(k, n, s) for k in kinds for n in lengths for s in seeds]
    for kind, n, seed in tqdm(jobs, desc="recording features", unit="prompt"):
        sample = make_sample(
            kind, seed, n, count_tokens=lambda t: len(tok.encode(t, add_special_tokens=False))
        )
        enc = tok(sample.prompt, return_offsets_mapping=True)
        a, b = fact_span(sample)
        offsets = torch.tensor(enc["offset_mapping"])
        in_fact = (offsets[:, 0] < b) & (offsets[:, 1] > a)
        rec = _Recorder(NammPolicy(raw))
        generate(model, None, enc["input_ids"], rec, 1, EvictionConfig(policy="namm", interval=feats.n_up))
        fact_end = int(torch.nonzero(in_fact).max())
        for x, pos in rec.steps:
            if int(pos.max()) <= fact_end:
                continue  # the fact is not (fully) cached yet
            xs.append(x.reshape(-1, x.shape[-1]))
            ys.append(in_fact[pos].repeat(x.shape[0]).float())
            local = pos // page_size
            local = local - local.min()
            per_head = int(local.max()) + 1
            heads = torch.arange(x.shape[0]).unsqueeze(1) * per_head
            pages.append((next_page + heads + local.unsqueeze(0)).reshape(-1))
            next_page += x.shape[0] * per_head
    return Recording(torch.cat(xs), torch.cat(ys), torch.cat(pages))


def page_logits(token_logits: Tensor, page: Tensor) -> Tensor:
    """Log-sum-exp of the token logits of each page id (a smooth max): [num_pages]."""
    top = page_max(token_logits.detach(), page)
    sums = torch.zeros_like(top).index_add(0, page, (token_logits - top[page]).exp())
    return top + sums.log()


def page_max(values: Tensor, page: Tensor) -> Tensor:
    """Each page id's largest value: the engine's page score (``--kv-eviction-page-score max``),
    and with 0/1 labels whether the page holds a positive token."""
    return torch.full((int(page.max()) + 1,), float("-inf"), dtype=values.dtype).scatter_reduce(
        0, page, values, "amax"
    )


def page_labels(y: Tensor, page: Tensor) -> Tensor:
    """1.0 for a page holding a positive token (0 for an id no token has)."""
    return page_max(y, page).clamp_min(0)


def auc(scores: Tensor, labels: Tensor) -> float:
    """ROC-AUC by the rank-sum formula."""
    order = torch.argsort(scores)
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


def fit_linear(
    x: Tensor, y: Tensor, l2: float = 1e-3, steps: int = 200, page: Tensor | None = None
) -> tuple[Tensor, float]:
    """Class-balanced logistic regression (L-BFGS): weights [d] and bias.

    With ``page`` the regression is over pages (multiple-instance): a page's logit is the
    log-sum-exp of its tokens' ``x @ w + b``, its label whether any token is positive.
    """
    x, y = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    target = y if page is None else page_labels(y, page)
    pos_weight = (1 - target).sum() / target.sum().clamp_min(1)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        if page is not None:
            logits = page_logits(logits, page)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), float(b.detach())


def build_weights(
    kind: str,
    window: int | None,
    gamma_per_step: float,
    mean: Tensor,
    std: Tensor,
    w: Tensor,
    b: float,
    provenance: dict,
    key_norm: bool = False,
):
    """A scorer of ``kind`` computing exactly ``w . x + b`` (hidden layers zero), in weights-file form."""
    from vllm_namm.config import FeatureConfig
    from vllm_namm.scorers import ScorerConfig, make_scorer
    from vllm_namm.weights import NammWeights, Provenance

    features = FeatureConfig(ema_coeff_per_step=gamma_per_step, key_norm=key_norm)
    cfg = ScorerConfig(kind=kind, window=window, input_dim=features.input_dim)  # type: ignore[arg-type]
    scorer = make_scorer(cfg)
    flat = torch.zeros(scorer.num_params)
    w_s, b_s = scorer.layers(flat)[-1]  # views into flat
    w_s[:, 0] = w
    b_s[0] = b
    return NammWeights(cfg, features, flat, mean, std, threshold=0.0, provenance=Provenance(**provenance))


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer, LlamaForCausalLM

    from evolve.command import command_line
    from vllm_namm.model_match import shape_of_model
    from vllm_namm.weights import describe, save_weights

    p = argparse.ArgumentParser(prog="python -m evolve.fit", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="local HF model dir (the served model)")
    p.add_argument("--out", type=Path, required=True, help="weights file to write")
    p.add_argument("--kinds", nargs="+", default=["passkey", "kv_retrieval", "needle"])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--train-seeds", type=int, default=8, help="training seeds 0..N-1 per kind and length")
    p.add_argument(
        "--held-out-seeds", type=int, default=4, help="held-out seeds 10**9.. for the reported AUC"
    )
    p.add_argument(
        "--ema", type=float, default=0.999, help="EMA coefficient per query step (the study: 0.999)"
    )
    p.add_argument("--scorer", default="bam", help="bam, bam-wN (windowed), or mlp")
    p.add_argument("--key-norm", action="store_true", help="add the cached key's L2 norm as a feature")
    p.add_argument(
        "--target",
        choices=["page", "token"],
        default="page",
        help="fit pages by their best token (what the engine selects) or single tokens",
    )
    p.add_argument("--page-size", type=int, default=32, help="the served --block-size (page target)")
    p.add_argument(
        "--init",
        choices=["fit", "l2"],
        default="fit",
        help="fit: the logistic fit; l2: score = -normalised key norm, i.e. the L2 baseline's ranking as a "
        "NAMM scorer (needs --key-norm; the recording still gives the normalisation and the AUCs)",
    )
    p.add_argument(
        "--budget-ratio",
        type=float,
        default=None,
        help="write this budget_ratio into the file (rank under it by default, as evolution will)",
    )
    p.add_argument(
        "--page-score",
        choices=["max", "mean", "vote"],
        default=None,
        help="write this page aggregation into the file (the server's --kv-eviction-page-score otherwise)",
    )
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    rec = functools.partial(
        record, model, tok, a.kinds, a.lengths, key_norm=a.key_norm, page_size=a.page_size
    )
    train = rec(list(range(a.train_seeds)), a.ema)
    x, y = train.x, train.y
    pos_dims = 8
    spec = x[:, pos_dims:]
    mean, std = spec.mean(0), spec.std(0).clamp_min(1e-7)
    x[:, pos_dims:] = (spec - mean) / std
    if a.init == "l2":
        if not a.key_norm:
            p.error("--init l2 needs --key-norm")
        w, b = torch.zeros(x.shape[1]), 0.0
        w[-1] = -1.0
    else:
        w, b = fit_linear(x, y, page=train.page if a.target == "page" else None)
    held = rec(list(range(HELD_OUT, HELD_OUT + a.held_out_seeds)), a.ema)
    held.x[:, pos_dims:] = (held.x[:, pos_dims:] - mean) / std
    aucs = {
        "train_auc": auc(x @ w + b, y),
        "held_out_auc": auc(held.x @ w + b, held.y),
    }
    # pages ranked as the engine ranks them: by their best token's score
    held_pages = page_labels(held.y, held.page)
    aucs["held_out_page_auc"] = auc(page_max(held.x @ w + b, held.page), held_pages)
    if a.key_norm:  # the L2 baseline's own ranking of the same held-out pages, for comparison
        aucs["held_out_page_auc_l2"] = auc(page_max(-held.x[:, -1], held.page), held_pages)
    train_auc, held_auc = aucs["train_auc"], aucs["held_out_auc"]
    kind, window = (
        ("bam", int(a.scorer.removeprefix("bam-w"))) if a.scorer.startswith("bam-w") else (a.scorer, None)
    )
    command = command_line("python -m evolve.fit", argv)
    prov = {
        "description": (
            "the L2 baseline's ranking as a NAMM scorer (score = -normalised key norm; statistics from "
            if a.init == "l2"
            else f"fitted offline: class-balanced logistic regression ({a.target} target) of the "
            f"{x.shape[1]} features on 'token is in the asked fact's sentence' ("
        )
        + f"{int(y.sum())} positive / {len(y)} token-steps, training seeds 0..{a.train_seeds - 1}); "
        f"hidden layers zero, so the score is that linear function; train AUC {train_auc:.3f}, held-out "
        f"AUC {held_auc:.3f}, held-out page AUC {aucs['held_out_page_auc']:.3f}; command: {command}",
        "base_model": str(a.model),
        "stages": [f"fit:{'+'.join(a.kinds)}@{'/'.join(map(str, a.lengths))}"],
    }
    weights = build_weights(kind, window, a.ema, mean, std, w, b, prov, key_norm=a.key_norm)
    weights.budget_ratio = a.budget_ratio
    weights.page_score = a.page_score
    weights.provenance = weights.provenance and weights.provenance.model_copy(
        update={"model_shape": shape_of_model(a.model)}
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(a.out, weights)
    print(describe(weights))
    print(
        json.dumps(
            {
                **aucs,
                "positives": int(y.sum()),
                "token_steps": len(y),
                "out": str(a.out),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
