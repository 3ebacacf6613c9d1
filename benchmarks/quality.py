"""Quality benchmark: retrieval accuracy of the full cache vs each eviction policy at 25 % / 50 % cache.

Why through the real server: the number that matters is what a user of ``vllm serve`` gets,
with page-granular freeing, chunked prompts and compacted block tables, not what a
reference implementation would get. One server is started with ``--kv-eviction namm`` and
each request picks its policy with ``vllm_xargs`` (``kv_eviction``, ``kv_eviction_ratio``,
``namm_threshold``), so all policies share one server start. The full-cache rows are
requests with ``kv_eviction=none`` on that server (same chunked prefill as the others).

Tasks are held-out synthetic samples (seeds >= 10**9; training used seeds < 10**7) of
``evolve.tasks.synthetic``. NAMM is not budgeted: its row shows the retained fraction it
chose, measured per request (``kv_transfer_params["namm"]["retained_fraction"]`` = KV
blocks still held / blocks the request's tokens span, at the end of the request); the
baselines' measured fraction is shown too (under token-level selection page rounding keeps
more than the ratio; page-level selection, the default, meets it in pages).
``--selection``/``--page-score``/``--page-rule`` set the server's selection, and
``--reference`` computes the same table with the HF reference runner, without a server.

Usage::

    python -m benchmarks quality                                     # defaults: see --help
    python -m benchmarks quality --lengths 2048 4096 8192 --samples 10 --namm-thresholds -0.5 0 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field

from benchmarks.results import command_line, markdown_table, results_dir, time_stamp
from benchmarks.serving import (
    ROOT,
    TRAINED_MODEL,
    BaseModel,
    check_realtext_inputs,
    token_counter,
    vllm_server,
)
from evolve.assets import SMOLLM2_DIR
from evolve.tasks.synthetic import TASK_KINDS as SYNTHETIC_KINDS
from vllm_namm.config import EvictionConfig
from vllm_namm.settings import ProtectConfig

BASELINES = ("streaming", "h2o", "l2", "snapkv")


class QualityConfig(BaseModel):
    model: str
    policies: list[str]
    ratios: list[float]
    namm_weights: str | None
    namm_thresholds: list[float | None]
    namm_files: dict[str, str] = Field(default_factory=dict)
    """label -> weights file of extra NAMM variants (each on a server of its own)."""
    namm_ratios: list[float] = Field(default_factory=list)
    one_shot_ratios: list[float] = Field(default_factory=list)
    one_shot_policies: list[str] = Field(default_factory=lambda: ["snapkv"])
    """Baselines that get one-shot rows beside NAMM's."""
    namm_incremental: bool = True
    """False: NAMM only in the one-shot rows (weights made for the one-shot step)."""
    kinds: list[str]
    lengths: list[int]
    samples: int
    seed_base: int
    max_tokens: int | None
    """None: each task's own (8 for synthetic tasks, per kind for realtext)."""
    interval: int
    block_size: int
    concurrency: int
    selection: str = "page"
    page_score: str = "max"
    page_rule: str = "all"
    recent_tokens: int = ProtectConfig.model_fields["recent_tokens"].default
    """Newest tokens no policy evicts (``--kv-eviction-recent-tokens``); SnapKV keeps its window anyway."""
    runner: str = "server"
    tasks: Literal["synthetic", "realtext"] = "synthetic"
    essays: str | None = None
    layer_pages: bool = False
    """Every eviction row again with per-layer pages (``--kv-eviction-granularity layer``)."""


class Setting(BaseModel):
    """One row of the table: a policy and its per-request ``vllm_xargs``, on the server of ``group``
    (a weights file and an interval are server settings)."""

    label: str
    policy: str
    ratio: float | None = None
    threshold: float | None = None
    group: str = "main"

    def xargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kv_eviction": self.policy}
        if self.ratio is not None:
            out["kv_eviction_ratio"] = self.ratio
        if self.threshold is not None:
            out["namm_threshold"] = self.threshold
        return out


class Outcome(BaseModel):
    setting: str
    kind: str
    length: int
    seed: int
    answer: str
    completion: str
    correct: float
    retained_fraction: float
    evicted_blocks: int
    prompt_tokens: int


class SettingSummary(BaseModel):
    setting: str
    policy: str
    ratio: float | None
    threshold: float | None
    accuracy: float
    accuracy_by_length: dict[int, float]
    accuracy_by_kind: dict[str, float]
    mean_retained_fraction: float
    n: int


class QualityReport(BaseModel):
    command: str
    started: str
    server_command: list[str]
    server_log: str
    wall_s: float
    config: QualityConfig
    summaries: list[SettingSummary]
    outcomes: list[Outcome] = Field(default_factory=list)
    paired: list[dict[str, Any]] = Field(default_factory=list)
    paired_namm: list[dict[str, Any]] = Field(default_factory=list)
    paired_layer: list[dict[str, Any]] = Field(default_factory=list)
    table: str = ""


ONE_SHOT = "one-shot"
LAYER = "layer"
"""The server group of the per-layer-page rows."""
LAYER_SUFFIX = f" [{LAYER}]"
"""What a per-layer-page row's label adds to its shared-page row's."""


def build_settings(cfg: QualityConfig) -> list[Setting]:
    """Rows: full cache, every baseline at every ratio, NAMM with the main weights (its default rule,
    extra thresholds, ranked at ``namm_ratios``), each extra weights file likewise (its own server),
    and kvpress-style one-shot rows (``one_shot_policies`` and NAMM, one step after the whole prompt)."""
    settings = [Setting(label="full", policy="none")]
    for policy in cfg.policies:
        for r in cfg.ratios:
            settings.append(Setting(label=f"{policy}@{r:g}", policy=policy, ratio=r))
    incremental = cfg.namm_thresholds if cfg.namm_incremental else []
    for t in incremental:
        settings.append(
            Setting(label="namm" if t is None else f"namm(thr={t:g})", policy="namm", threshold=t)
        )
    if incremental:
        settings += [Setting(label=f"namm@{r:g}", policy="namm", ratio=r) for r in cfg.namm_ratios]
    for name, _ in cfg.namm_files.items():
        settings.append(Setting(label=f"namm[{name}]", policy="namm", group=name))
        settings += [
            Setting(label=f"namm[{name}]@{r:g}", policy="namm", ratio=r, group=name) for r in cfg.namm_ratios
        ]
    for r in cfg.one_shot_ratios:
        settings += [
            Setting(label=f"{policy} one-shot@{r:g}", policy=policy, ratio=r, group=ONE_SHOT)
            for policy in cfg.one_shot_policies
        ]
        if cfg.namm_thresholds:
            settings.append(Setting(label=f"namm one-shot@{r:g}", policy="namm", ratio=r, group=ONE_SHOT))
    if cfg.layer_pages:  # the main server's eviction rows once more, each layer freeing its own pages
        settings += [
            s.model_copy(update={"label": s.label + LAYER_SUFFIX, "group": LAYER})
            for s in settings
            if s.group == "main" and s.policy != "none"
        ]
    return settings


Correct = dict[tuple[str, str, int, int], float]
"""(setting, kind, length, seed) -> correct: every outcome by the prompt it answered."""


def correct_by_prompt(outcomes: list[Outcome]) -> Correct:
    return {(o.setting, o.kind, o.length, o.seed): o.correct for o in outcomes}


def paired_counts(by: Correct, setting: str, reference: str) -> dict[str, Any]:
    """On the prompts both rows answered: those ``setting`` gets right and ``reference`` wrong
    (wins), and the reverse (losses)."""
    keys = [k[1:] for k in by if k[0] == setting and (reference, *k[1:]) in by]
    wins = sum(by[(setting, *k)] > by[(reference, *k)] for k in keys)
    losses = sum(by[(setting, *k)] < by[(reference, *k)] for k in keys)
    return {"setting": setting, "against": reference, "prompts": len(keys), "wins": wins, "losses": losses}


def paired_against(
    outcomes: list[Outcome], settings: list[Setting], reference: str = "streaming"
) -> list[dict[str, Any]]:
    """Per setting with a ratio: wins and losses against ``reference`` at the same ratio."""
    by = correct_by_prompt(outcomes)
    rows = []
    for st in settings:
        ref = f"{reference}@{st.ratio:g}" if st.ratio is not None else None
        if ref is None or st.label == ref or not any(s.label == ref for s in settings):
            continue
        rows.append(paired_counts(by, st.label, ref))
    return rows


def paired_layer(outcomes: list[Outcome], settings: list[Setting]) -> list[dict[str, Any]]:
    """Each per-layer-page row against the same policy and budget on shared pages (same prompts)."""
    by = correct_by_prompt(outcomes)
    rows = []
    for st in settings:
        if st.group != LAYER:
            continue
        row = paired_counts(by, st.label, st.label.removesuffix(LAYER_SUFFIX))
        if row["prompts"]:
            rows.append(row | {"sign_test_p": sign_test_p(row["wins"], row["losses"])})
    return rows


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test on the discordant prompts: how likely a split at least this
    uneven is if neither setting were better (ties carry no information)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_namm(
    outcomes: list[Outcome], settings: list[Setting], summaries: list[SettingSummary], tol: float = 0.01
) -> list[dict[str, Any]]:
    """Each NAMM row against the full cache and every baseline row at the same measured retained
    fraction (within ``tol``; one-shot rows against one-shot rows), on the same prompts.

    Why by measured fraction: a NAMM row ranked under its file's budget has no ratio label, and
    "equal memory" is what the comparison must hold."""
    by = correct_by_prompt(outcomes)
    kept = {s.setting: s.mean_retained_fraction for s in summaries}
    one_shot = {s.label for s in settings if s.group == ONE_SHOT}
    rows = []
    for st in settings:
        if st.policy != "namm" or st.label not in kept:
            continue
        others = ["full"] + [
            b.label
            for b in settings
            if b.policy in BASELINES
            and (b.label in one_shot) == (st.label in one_shot)
            and b.label in kept
            and abs(kept[b.label] - kept[st.label]) <= tol
        ]
        for ref in others:
            row = paired_counts(by, st.label, ref)
            if row["prompts"]:
                rows.append(row | {"sign_test_p": sign_test_p(row["wins"], row["losses"])})
    return rows


SYNTHETIC_MAX_TOKENS = 8


def max_tokens_for(sample: Any, cfg: QualityConfig) -> int:
    """``--max-tokens`` when given, else the task's own (a real-text sample knows its answer's length)."""
    if cfg.max_tokens is not None:
        return cfg.max_tokens
    return getattr(sample, "max_tokens", SYNTHETIC_MAX_TOKENS)


def score_sample(sample: Any, completion: str) -> float:
    """The task's own metric: first-number match for synthetic tasks, per-kind scores for real text."""
    if getattr(sample, "family", None) == "realtext":
        from evolve.tasks.realtext import score_answer as score_realtext

        return score_realtext(completion, sample)
    from evolve.tasks.synthetic import score_answer

    return score_answer(completion, sample.answer)


async def _ask(
    client: httpx.AsyncClient,
    sem: asyncio.Semaphore,
    model: str,
    setting: Setting,
    sample: Any,
    max_tokens: int,
    bar: Any,
) -> Outcome:
    body = {
        "model": model,
        "prompt": sample.prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "vllm_xargs": setting.xargs(),
    }
    async with sem:
        resp = await client.post("/v1/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(
            f"{setting.label} {sample.kind} seed {sample.seed}: HTTP {resp.status_code}: {resp.text[:500]}"
        )
    data = resp.json()
    text = data["choices"][0]["text"]
    namm = (data.get("kv_transfer_params") or {}).get("namm") or {}
    bar.update(1)
    return Outcome(
        setting=setting.label,
        kind=sample.kind,
        length=sample.target_tokens,
        seed=sample.seed,
        answer=sample.answer,
        completion=text,
        correct=score_sample(sample, text),
        retained_fraction=float(namm.get("retained_fraction", 1.0)),
        evicted_blocks=int(namm.get("evicted_blocks", 0)),
        prompt_tokens=int(data.get("usage", {}).get("prompt_tokens", 0)),
    )


async def _run_all(
    url: str, settings: list[Setting], samples: list[Any], cfg: QualityConfig
) -> list[Outcome]:
    from tqdm import tqdm

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0)) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        sem = asyncio.Semaphore(cfg.concurrency)
        bar = tqdm(
            total=len(settings) * len(samples),
            desc="quality",
            unit="req",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        try:
            # settings interleaved per sample, so a slow policy does not sit at the end alone
            return list(
                await asyncio.gather(
                    *(
                        _ask(client, sem, model, st, sm, max_tokens_for(sm, cfg), bar)
                        for sm in samples
                        for st in settings
                    )
                )
            )
        finally:
            bar.close()


def _run_reference(settings: list[Setting], samples: list[Any], cfg: QualityConfig) -> list[Outcome]:
    """The same table from :mod:`vllm_namm.reference` on the Hugging Face model, no server.

    Pages are ``cfg.block_size`` logical positions (page-level selection); token-level
    selection is the reference's per-head rule (evo-memory), not a page rule. The retained
    fraction is cached tokens / context tokens, averaged over layers; unlike the engine, the
    reference never scores the prompt's last chunk shorter than the interval, so it keeps
    that tail.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vllm_namm.config import BudgetConfig
    from vllm_namm.policies import make_policy
    from vllm_namm.reference import generate

    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = LlamaForCausalLM.from_pretrained(cfg.model, torch_dtype=torch.float32).eval()
    outcomes = []
    with tqdm(
        total=len(settings) * len(samples), desc="quality (reference)", unit="req", file=sys.stderr
    ) as bar:
        for sample in samples:
            ids = tok(sample.prompt, add_special_tokens=cfg.tasks != "realtext")["input_ids"]
            for st in settings:
                ecfg = EvictionConfig(
                    policy=st.policy,
                    interval=cfg.interval,
                    selection=cfg.selection,
                    page_score=cfg.page_score,
                    page_rule=cfg.page_rule,
                    protect=ProtectConfig(recent_tokens=cfg.recent_tokens),
                    budget=None if st.ratio is None else BudgetConfig(ratio=st.ratio),
                    weights=cfg.namm_weights if st.policy == "namm" else None,
                    threshold=st.threshold,
                )
                out = generate(
                    model,
                    tok,
                    ids,
                    make_policy(ecfg),
                    max_tokens_for(sample, cfg),
                    ecfg,
                    page_size=cfg.block_size,
                )
                text = tok.decode(out.tokens, skip_special_tokens=True)
                context = len(ids) + len(out.tokens) - 1
                outcomes.append(
                    Outcome(
                        setting=st.label,
                        kind=sample.kind,
                        length=sample.target_tokens,
                        seed=sample.seed,
                        answer=sample.answer,
                        completion=text,
                        correct=score_sample(sample, text),
                        retained_fraction=sum(out.cache_lengths) / (len(out.cache_lengths) * context),
                        evicted_blocks=0,
                        prompt_tokens=len(ids),
                    )
                )
                bar.update(1)
    return outcomes


def summarise(settings: list[Setting], outcomes: list[Outcome]) -> list[SettingSummary]:
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    out = []
    for st in settings:
        rows = [o for o in outcomes if o.setting == st.label]
        by_len: dict[int, list[float]] = defaultdict(list)
        by_kind: dict[str, list[float]] = defaultdict(list)
        for o in rows:
            by_len[o.length].append(o.correct)
            by_kind[o.kind].append(o.correct)
        out.append(
            SettingSummary(
                setting=st.label,
                policy=st.policy,
                ratio=st.ratio,
                threshold=st.threshold,
                accuracy=mean([o.correct for o in rows]),
                accuracy_by_length={k: mean(v) for k, v in sorted(by_len.items())},
                accuracy_by_kind={k: mean(v) for k, v in by_kind.items()},
                mean_retained_fraction=mean([o.retained_fraction for o in rows]),
                n=len(rows),
            )
        )
    return out


def format_table(report: QualityReport) -> str:
    cfg = report.config
    full = next(s for s in report.summaries if s.setting == "full")
    header = (
        ["setting", "cache ratio", "retained (measured)", "accuracy", "vs full"]
        + [f"acc@{n}" for n in cfg.lengths]
        + [f"acc {k}" for k in cfg.kinds]
    )
    rows = []
    for s in report.summaries:
        rows.append(
            [
                s.setting,
                "-" if s.ratio is None else f"{s.ratio:g}",
                f"{s.mean_retained_fraction:.3f}",
                f"{s.accuracy:.3f}",
                f"{s.accuracy - full.accuracy:+.3f}" if s is not full else "",
                *[f"{s.accuracy_by_length.get(n, math.nan):.2f}" for n in cfg.lengths],
                *[f"{s.accuracy_by_kind.get(k, math.nan):.2f}" for k in cfg.kinds],
            ]
        )
    lines = [
        f"{cfg.samples} held-out {cfg.tasks} samples per kind and length (seeds {cfg.seed_base}+i), kinds "
        f"{', '.join(cfg.kinds)}, lengths {', '.join(map(str, cfg.lengths))}; greedy, max_tokens "
        f"{cfg.max_tokens or 'per task'}; eviction interval {cfg.interval}; model {Path(cfg.model).name}; "
        f"selection {cfg.selection}"
        + (f" (page score {cfg.page_score})" if cfg.selection == "page" else f" (page rule {cfg.page_rule})")
        + ("; HF reference runner, no server" if cfg.runner == "reference" else ""),
        *markdown_table(header, rows),
    ]
    if report.paired:
        lines.append(
            "paired against streaming at the same ratio (same prompts): "
            + "; ".join(
                f"{p['setting']} {p['wins']} wins / {p['losses']} losses of {p['prompts']}"
                for p in report.paired
            )
        )
    if report.paired_namm:
        lines += [
            "",
            "NAMM paired against the full cache and every baseline at the same measured retained fraction "
            "(wins = NAMM right and the other wrong, same prompts; p = two-sided sign test):",
            *_paired_table("NAMM setting", report.paired_namm),
        ]
    if report.paired_layer:
        lines += [
            "",
            "Per-layer pages paired against shared pages, same policy and budget (wins = per-layer right "
            "and shared wrong, same prompts; p = two-sided sign test):",
            *_paired_table("per-layer setting", report.paired_layer),
        ]
    lines.append(f"command: {report.command}")
    return "\n".join(lines)


def _paired_table(first: str, pairs: list[dict[str, Any]]) -> list[str]:
    return markdown_table(
        [first, "against", "prompts", "wins", "losses", "wins - losses", "p"],
        [
            [
                p["setting"],
                p["against"],
                str(p["prompts"]),
                str(p["wins"]),
                str(p["losses"]),
                f"{(p['wins'] - p['losses']) / p['prompts']:+.1%}",
                f"{p['sign_test_p']:.3f}" if p["sign_test_p"] >= 0.001 else "<0.001",
            ]
            for p in pairs
        ],
    )


def series_of(summary: SettingSummary) -> str:
    """The curve a row belongs to: its policy, one-shot rows and each extra NAMM weights file apart
    (joining them to the policy's line would draw a curve through different methods)."""
    if ONE_SHOT in summary.setting:
        return f"{summary.policy} {ONE_SHOT}"
    if summary.setting.startswith("namm["):
        return summary.setting.split("]")[0] + "]"
    if summary.setting.endswith(LAYER_SUFFIX):
        return summary.policy + LAYER_SUFFIX
    return summary.policy


def plot(report: QualityReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[SettingSummary]] = defaultdict(list)
    for s in report.summaries:
        groups[series_of(s)].append(s)
    for series, items in groups.items():
        policy = items[0].policy
        items.sort(key=lambda s: s.mean_retained_fraction)
        xs = [s.mean_retained_fraction for s in items]
        ys = [s.accuracy for s in items]
        if policy == "none":
            ax.axhline(ys[0], color="black", ls="--", lw=1, label=f"full cache ({ys[0]:.2f})")
        else:
            one_shot = ONE_SHOT in series
            ax.plot(
                xs,
                ys,
                marker="*" if policy == "namm" else "o",
                ms=10 if policy == "namm" else 6,
                ls="none" if one_shot else "-",
                mfc="none" if one_shot else None,
                label=series,
            )
    ax.set_xlabel("retained fraction of KV blocks (measured)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"{Path(report.config.model).name}: held-out {report.config.tasks} tasks, "
        f"{'/'.join(map(str, report.config.lengths))} tokens",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--tasks",
        choices=["synthetic", "realtext"],
        default="synthetic",
        help="synthetic: evolve.tasks.synthetic (for our tiny model); realtext: evolve.tasks.realtext over the "
        "essays, in the model's chat template (for a real model, e.g. SmolLM2)",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"default: {TRAINED_MODEL.relative_to(ROOT)} (synthetic), {SMOLLM2_DIR.relative_to(ROOT)} (realtext)",
    )
    p.add_argument(
        "--essays", type=Path, default=None, help="realtext: essays folder (default: the fetched one)"
    )
    p.add_argument(
        "--policies",
        nargs="*",
        default=list(BASELINES),
        choices=BASELINES,
        help="none: full cache and NAMM only",
    )
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--namm-weights", type=Path, default=None, help="default: the shipped evolved weights")
    p.add_argument(
        "--namm-extra",
        nargs="*",
        default=[],
        metavar="LABEL=FILE",
        help="more NAMM weights files, each compared on a server of its own (rows namm[LABEL])",
    )
    p.add_argument(
        "--namm-ratios",
        nargs="*",
        type=float,
        default=[],
        help="NAMM ranked under these budgets too (rows namm@R, namm[LABEL]@R)",
    )
    p.add_argument(
        "--one-shot-ratios",
        nargs="*",
        type=float,
        default=[],
        help="kvpress-style rows: --one-shot-policies and NAMM with one eviction step after the whole prompt "
        "(question included), at these budgets",
    )
    p.add_argument(
        "--one-shot-policies",
        nargs="*",
        default=["snapkv"],
        choices=BASELINES,
        help="baselines with one-shot rows (default snapkv)",
    )
    p.add_argument(
        "--no-namm-incremental",
        action="store_true",
        help="NAMM only in the one-shot rows (for weights made for the one-shot step)",
    )
    p.add_argument(
        "--namm-thresholds",
        nargs="*",
        type=float,
        default=None,
        help="extra namm rows at these score thresholds (more points on the curve)",
    )
    p.add_argument("--no-namm", action="store_true")
    p.add_argument(
        "--layer-pages",
        action="store_true",
        help="every eviction row again on a server with per-layer pages (--kv-eviction-granularity layer; rows "
        "'ROW [layer]'), paired against its shared-page row",
    )
    p.add_argument("--kinds", nargs="+", default=None, help="default: every kind of --tasks")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096])
    p.add_argument("--samples", type=int, default=4, help="held-out samples per kind and length")
    p.add_argument("--seed-base", type=int, default=10**9)
    p.add_argument(
        "--max-tokens", type=int, default=None, help="default: 8 for synthetic tasks, per kind for realtext"
    )
    p.add_argument("--interval", type=int, default=512, help="--kv-eviction-interval of the server")
    p.add_argument(
        "--page-rule",
        choices=["all", "majority", "any"],
        default="all",
        help="--kv-eviction-page-rule of the server (per-head policies free little under 'all')",
    )
    defaults = EvictionConfig.model_fields
    p.add_argument(
        "--selection",
        choices=["page", "token"],
        default=defaults["selection"].default,
        help="--kv-eviction-selection of the server: budget policies keep whole pages within the "
        "budget (page) or each head's tokens, freed by --page-rule (token)",
    )
    p.add_argument(
        "--page-score",
        choices=["max", "mean", "vote"],
        default=defaults["page_score"].default,
        help="--kv-eviction-page-score of the server (page-level selection)",
    )
    p.add_argument(
        "--recent-tokens",
        type=int,
        default=ProtectConfig.model_fields["recent_tokens"].default,
        help="--kv-eviction-recent-tokens of the server: newest tokens no policy evicts (SnapKV keeps its "
        "observation window whatever this says; 32 puts the other policies on the same footing)",
    )
    p.add_argument("--block-size", type=int, default=32, help="KV block size (= page size with --reference)")
    p.add_argument(
        "--reference",
        action="store_true",
        help="run vllm_namm.reference on the Hugging Face model instead of a server (slow; same "
        "selection settings, pages of --block-size tokens)",
    )
    p.add_argument("--kv-space-gib", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default benchmarks/results/quality-<time>)"
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        help="re-analyse a saved quality.json (table, paired counts, plot) without running anything",
    )
    return p.parse_args(argv)


class InputError(Exception):
    """Bad input (a model, essays, kinds or seeds that cannot serve); the message is what the user sees."""


def prepare_samples(args: argparse.Namespace) -> list[Any]:
    """Fill in the task family's defaults (``--model``, ``--kinds``), check the model (and the
    essays) and build the held-out samples of every kind and length."""
    if args.tasks == "realtext":
        from evolve.assets import AssetError
        from evolve.tasks.realtext import REALTEXT_KINDS, load_tokenizer, make_sample

        args.model = args.model or SMOLLM2_DIR
        args.kinds = args.kinds or list(REALTEXT_KINDS)
        try:
            seeds = [args.seed_base, args.seed_base + args.samples - 1]
            args.essays = check_realtext_inputs(args.model, args.essays, args.kinds, seeds)
            tok = load_tokenizer(str(args.model.resolve()))
            return [
                make_sample(k, args.seed_base + i, n, tok, essays_dir=args.essays)
                for n in args.lengths
                for k in args.kinds
                for i in range(args.samples)
            ]
        except AssetError as e:
            raise InputError(str(e)) from None
        except ValueError as e:
            raise InputError(f"quality error: {e}") from None
    args.model = args.model or TRAINED_MODEL
    args.kinds = args.kinds or list(SYNTHETIC_KINDS)
    bad = [k for k in args.kinds if k not in SYNTHETIC_KINDS]
    if bad:
        raise InputError(f"quality error: {bad[0]!r} is not a synthetic kind ({', '.join(SYNTHETIC_KINDS)})")
    if not ((args.model / "config.json").exists() and any(args.model.glob("*.safetensors"))):
        raise InputError(
            f"quality: no model at {args.model}. The accuracy of eviction policies is only meaningful on a model "
            f"that can solve the tasks with a full cache; train ours first (CPU, about an hour):\n"
            f"    python -m benchmarks train-model --out {TRAINED_MODEL.relative_to(ROOT)}\n"
            f"or pass --model DIR."
        )
    from evolve.tasks.synthetic import make_sample

    count = token_counter(args.model.resolve())
    return [
        make_sample(k, args.seed_base + i, n, count)
        for n in args.lengths
        for k in args.kinds
        for i in range(args.samples)
    ]


def main(argv: list[str] | None = None) -> int:
    import time

    args = parse_args(argv)
    if args.report is not None:
        try:
            saved = QualityReport.model_validate_json(args.report.read_text())
        except (OSError, ValueError) as e:
            print(f"quality: cannot read the report {args.report}: {e}", file=sys.stderr)
            return 2
        return _finish(saved, args.report.parent)
    command = command_line("python -m benchmarks quality", argv)
    try:
        samples = prepare_samples(args)
    except InputError as e:
        print(e, file=sys.stderr)
        return 2
    if args.seed_base < 10**9:
        print("quality: warning: seeds below 10**9 may overlap the training seeds", file=sys.stderr)

    thresholds: list[float | None] = [] if args.no_namm else [None, *(args.namm_thresholds or [])]
    stamp = time_stamp()
    out_dir: Path = args.out or results_dir("quality", stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve()
    extra = dict(item.split("=", 1) for item in args.namm_extra)
    cfg = QualityConfig(
        model=str(model),
        policies=args.policies,
        ratios=args.ratios,
        namm_weights=str(args.namm_weights) if args.namm_weights else None,
        namm_thresholds=thresholds,
        namm_files=extra,
        namm_ratios=args.namm_ratios,
        one_shot_ratios=args.one_shot_ratios,
        one_shot_policies=args.one_shot_policies,
        namm_incremental=not args.no_namm_incremental,
        kinds=args.kinds,
        lengths=args.lengths,
        samples=args.samples,
        seed_base=args.seed_base,
        max_tokens=args.max_tokens,
        interval=args.interval,
        block_size=args.block_size,
        concurrency=args.concurrency,
        selection=args.selection,
        page_score=args.page_score,
        page_rule=args.page_rule,
        recent_tokens=args.recent_tokens,
        runner="reference" if args.reference else "server",
        tasks=args.tasks,
        essays=str(args.essays) if args.essays else None,
        layer_pages=args.layer_pages,
    )
    settings = build_settings(cfg)
    # No prefix caching: every setting asks the same prompts, and a cache hit would hand an
    # evicting request blocks computed (and kept) by another setting, skipping the prompt
    # chunks its policy must see.
    longest = max(args.lengths) + max(max_tokens_for(s, cfg) for s in samples) + args.block_size
    max_model_len = -(-longest // args.block_size) * args.block_size

    def flags_for(group: str) -> list[str]:
        interval = (
            1 << 20 if group == ONE_SHOT else args.interval
        )  # longer than any prompt: one step at its end
        flags = [
            "--kv-eviction",
            "namm",
            "--kv-eviction-interval",
            str(interval),
            "--no-enable-prefix-caching",
            "--kv-eviction-page-rule",
            args.page_rule,
            "--kv-eviction-selection",
            args.selection,
            "--kv-eviction-page-score",
            args.page_score,
            "--kv-eviction-recent-tokens",
            str(args.recent_tokens),
        ]
        if group == LAYER:
            flags += ["--kv-eviction-granularity", "layer"]
        weights = extra.get(group, str(args.namm_weights) if args.namm_weights else None)
        return flags + (["--namm-weights", weights] if weights else [])

    print(
        f"model {model}: {len(settings)} settings x {len(samples)} prompts; log in {out_dir}", file=sys.stderr
    )
    t0 = time.monotonic()
    server_command: list[str] = []
    server_log = ""
    outcomes: list[Outcome] = []

    def report_so_far() -> QualityReport:
        return QualityReport(
            command=command,
            started=stamp,
            server_command=server_command,
            server_log=server_log,
            wall_s=time.monotonic() - t0,
            config=cfg,
            summaries=[],
            outcomes=outcomes,
        )

    if args.reference:
        outcomes = _run_reference(settings, samples, cfg)
    else:
        for group in dict.fromkeys(s.group for s in settings):  # in order: main first
            rows = [s for s in settings if s.group == group]
            log = out_dir / ("server.log" if group == "main" else f"server-{group}.log")
            with vllm_server(
                model,
                flags_for(group),
                log=log,
                kv_space_gib=args.kv_space_gib,
                max_model_len=max_model_len,
                block_size=args.block_size,
                timeout_s=args.startup_timeout,
            ) as server:
                outcomes += asyncio.run(_run_all(server.url, rows, samples, cfg))
            if group == "main":
                server_command, server_log = server.command, str(server.log)
            # what is measured so far survives a run stopped before its last server
            (out_dir / "quality.partial.json").write_text(report_so_far().model_dump_json(indent=1))
    return _finish(report_so_far(), out_dir)


def analyse(report: QualityReport) -> QualityReport:
    """Summaries, paired counts and the table, all derived from the outcomes (so a saved report
    can be re-analysed without re-running a request)."""
    settings = build_settings(report.config)
    report.summaries = summarise(settings, report.outcomes)
    report.paired = paired_against(report.outcomes, settings)
    report.paired_namm = paired_namm(report.outcomes, settings, report.summaries)
    report.paired_layer = paired_layer(report.outcomes, settings)
    report.table = format_table(report)
    return report


def _finish(report: QualityReport, out_dir: Path) -> int:
    report = analyse(report)
    json_path = out_dir / "quality.json"
    json_path.write_text(report.model_dump_json(indent=1))
    try:
        plot(report, out_dir / "accuracy_vs_retained.png")
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)", file=sys.stderr)
    print(report.table)
    print(f"results: {json_path} ({report.wall_s:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
