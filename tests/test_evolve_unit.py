"""Unit tests of ``python -m evolve`` without a vLLM server (fake HTTP server / fake client)."""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.launch import free_port
from evolve.baseline import BaselineCache, baseline_key
from evolve.client import (
    BadSettingError,
    EvalClient,
    GenerationResult,
    ServerUnreachableError,
    retained_fraction_of,
)
from evolve.config import CMAConfig, ConfigError, ServerConfig, load_config, validate_config
from evolve.fitness import SampleOutcome, compute_fitness
from evolve.strategy import Strategy, cma_options, elite_count
from evolve.tasks import metrics as m
from evolve.tasks.longbench import DATASETS, load_longbench, score_sample
from evolve.tasks.synthetic import TASK_KINDS, make_sample
from vllm_namm.shipped_weights import DEFAULT_WEIGHTS

# --------------------------------------------------------------------------------------------------
# LongBench metrics, hand-computed


def test_qa_f1_english_normalisation():
    # "The cat sat." -> "cat sat"; "a cat sat on the mat" -> "cat sat on mat": P=1, R=1/2, F1=2/3
    assert m.qa_f1_score("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)
    assert m.qa_f1_score("Paris!", "paris") == 1.0
    assert m.qa_f1_score("London", "Paris") == 0.0
    assert m.qa_f1_score("", "Paris") == 0.0


def test_qa_f1_chinese_characters():
    # 北京大学 vs 北京: 4 vs 2 chars, 2 shared: P=1/2, R=1 -> 2/3
    assert m.qa_f1_zh_score("北京大学。", "北京") == pytest.approx(2 / 3)
    # ASCII runs stay whole: [gpt4, 模, 型] vs [gpt4]: P=1/3, R=1 -> 1/2
    assert m.qa_f1_zh_score("GPT4模型", "gpt4") == pytest.approx(0.5)
    assert m.zh_tokens("你好，World 42！") == ["你", "好", "world", "42"]


def test_retrieval_score_exact_paragraph():
    assert m.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert m.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5  # 1 of 2 numbers
    assert m.retrieval_score("Paragraph 1", "Paragraph 12") == 0.0  # no partial-number credit
    assert m.retrieval_score("I don't know", "Paragraph 12") == 0.0
    assert m.retrieval_zh_score("段落5", "段落5") == 1.0


def test_rouge_l():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P=1, R=1/2 -> F=2/3
    assert m.rouge_score("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert m.rouge_score("", "anything") == 0.0
    # Chinese: characters: LCS(北京大学, 北京) = 2: P=1/2, R=1 -> 2/3
    assert m.rouge_zh_score("北京大学", "北京") == pytest.approx(2 / 3)


def test_classification_score():
    classes = ["Location", "Human being", "Number", "Manner of an action", "Manner"]
    assert m.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert m.classification_score("Location or Number", "Number", all_classes=classes) == 0.5
    assert m.classification_score("no idea", "Number", all_classes=classes) == 0.0
    # "Manner" is a strict substring of the truth, so naming the truth is not penalised for it
    assert m.classification_score("Manner of an action", "Manner of an action", all_classes=classes) == 1.0
    # trec is scored on the first line only, best over answers
    assert (
        m.score_prediction("trec", "classification_score", "\nLocation\nNumber", ["Location"], classes) == 1.0
    )
    assert m.score_prediction("hotpotqa", "qa_f1_score", "Paris", ["London", "paris"]) == 1.0


def test_longbench_loader(tmp_path: Path):
    rows = [
        {
            "input": "An abstract {with braces}.",
            "context": "Paragraph 1: a {x}.\n\nParagraph 2: b.",
            "answers": ["Paragraph 2"],
            "length": 10,
            "all_classes": None,
            "dataset": "passage_retrieval_en",
            "_id": "abc",
        },
    ]
    path = tmp_path / "pr.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (s,) = load_longbench(path, "passage_retrieval_en")
    assert s.max_tokens == 32
    assert s.prompt.startswith("Here are 30 paragraphs from Wikipedia")
    assert "Paragraph 1: a {x}." in s.prompt and "An abstract {with braces}." in s.prompt
    assert s.prompt.endswith("The answer is: ")
    assert score_sample(s, "Paragraph 2") == 1.0
    for name in ["passage_retrieval_en", "dureader", "narrativeqa", "qasper", "hotpotqa", "trec"]:
        assert name in DATASETS
    assert (DATASETS["dureader"].max_tokens, DATASETS["dureader"].metric) == (128, "rouge_zh_score")
    assert (DATASETS["trec"].max_tokens, DATASETS["trec"].metric) == (64, "classification_score")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_longbench(bad, "narrativeqa")


# --------------------------------------------------------------------------------------------------
# Synthetic tasks


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_synthetic_deterministic_and_answer_in_prompt(kind: str):
    a = make_sample(kind, 7, 600)
    b = make_sample(kind, 7, 600)
    assert a == b
    assert a.answer in a.prompt
    assert len(a.prompt) <= 600
    assert make_sample(kind, 8, 600).prompt != a.prompt


def test_sample_draws_deterministic():
    from evolve.config import TaskConfig
    from evolve.samples import TaskPool, generation_rng

    pool = TaskPool(TaskConfig(kind="passkey", target_tokens=[300, 400], pool_size=16))
    a = [s.key for s in pool.draw(4, generation_rng(1, 0, 3, 0))]
    b = [s.key for s in pool.draw(4, generation_rng(1, 0, 3, 0))]
    c = [s.key for s in pool.draw(4, generation_rng(1, 0, 4, 0))]
    assert a == b and a != c and len(set(a)) == 4


# --------------------------------------------------------------------------------------------------
# Fitness normalisation


def _o(task: str, cand: float | None, base: float | None, kept: float = 1.0) -> SampleOutcome:
    return SampleOutcome(task, cand, base, kept)


def test_fitness_ratio_of_means_averaged_over_tasks():
    r = compute_fitness([_o("a", 1, 1), _o("a", 0, 1), _o("b", 0.5, 0.5), _o("b", 0.5, 1)])
    # a: 0.5 / 1.0 = 0.5 ; b: 0.5 / 0.75 = 2/3 ; mean = 7/12
    assert r.mode == "normalized"
    assert r.fitness == pytest.approx((0.5 + 2 / 3) / 2)
    assert r.excluded == []


def test_fitness_zero_baseline_excluded_and_raw_fallback():
    r = compute_fitness([_o("a", 1, 1), _o("b", 1, 0), _o("b", 0, 0)])
    assert r.fitness == pytest.approx(1.0) and r.excluded == ["b"] and r.mode == "normalized"
    r = compute_fitness([_o("a", 0.5, 0), _o("b", 1, 0)])
    assert r.mode == "raw" and r.fitness == pytest.approx(0.75) and sorted(r.excluded) == ["a", "b"]


def test_fitness_failures_dropped_from_both_sides_and_penalty():
    r = compute_fitness([_o("a", 1, 1, 0.4), _o("a", None, 1), _o("a", 0, None, 0.6)], retained_penalty=0.5)
    assert r.failed == 2 and r.samples == 1
    assert r.retained_fraction == pytest.approx(0.5)  # over the candidate's successful requests
    assert r.fitness == pytest.approx(1.0 - 0.5 * 0.5)
    assert compute_fitness([_o("a", None, 1)]).fitness is None


# --------------------------------------------------------------------------------------------------
# CMA-ES mapping


def test_elite_ratio_maps_to_cma_mu():
    assert elite_count(32, 0.5) == 16
    assert elite_count(4, 0.5) == 2
    assert elite_count(5, 0.5) == 2
    assert elite_count(3, 0.1) == 1
    assert elite_count(8, 1.0) == 8
    with pytest.raises(ValueError):
        elite_count(8, 0.0)
    opts = cma_options(CMAConfig(popsize=32, elite_ratio=0.5, c_mean=1.0, seed=3))
    assert opts["popsize"] == 32 and opts["CMA_mu"] == 16 and opts["CMA_cmean"] == 1.0 and opts["seed"] == 3
    assert opts["verb_log"] == 0  # no outcmaes/ files
    s = Strategy(np.zeros(10), CMAConfig(popsize=12, elite_ratio=0.25))
    assert s.es.sp.weights.mu == 3 and s.popsize == 12 and s.sigma == pytest.approx(0.065)
    with pytest.raises(ValueError, match="dedicated"):
        cma_options(CMAConfig(options={"popsize": 3}))


def test_strategy_maximises_and_state_roundtrip():
    s = Strategy(np.zeros(5), CMAConfig(popsize=8, sigma0=0.5, seed=2))
    for _ in range(15):
        xs = s.ask()
        s.tell([-float(np.sum((x - 1.0) ** 2)) for x in xs])  # maximum at x = 1
    assert np.all(s.mean > 0.3)
    state = pickle.loads(pickle.dumps(s.state_dict()))
    expected = s.ask()
    s2 = Strategy.from_state_dict(state)
    np.testing.assert_array_equal(np.array(s2.ask()), np.array(expected))


# --------------------------------------------------------------------------------------------------
# Config


def test_config_validation_names_the_field():
    base = {"stages": [{"generations": 1, "tasks": [{"kind": "passkey", "target_tokens": [600]}]}]}
    cfg = validate_config(base)
    assert cfg.cma.popsize == 32 and cfg.cma.sigma0 == 0.065 and cfg.samples_per_task == 64
    assert cfg.retained_penalty == 0.0 and not cfg.extra_params.evolve_gamma
    with pytest.raises(ConfigError, match=r"cma\.elite_ratio"):
        validate_config({**base, "cma": {"elite_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"stages\.0\.tasks\.0.*target_tokens"):
        validate_config({"stages": [{"generations": 1, "tasks": [{"kind": "passkey"}]}]})
    with pytest.raises(ConfigError, match=r"server\.bogus"):
        validate_config({**base, "server": {"bogus": 1}})
    with pytest.raises(ConfigError, match="dataset"):
        validate_config(
            {
                "stages": [
                    {"generations": 1, "tasks": [{"kind": "longbench", "dataset": "nope", "path": "x.jsonl"}]}
                ]
            }
        )


def test_config_file_and_overrides(tmp_path: Path):
    p = tmp_path / "c.json"
    p.write_text(
        json.dumps({"stages": [{"generations": 1, "tasks": [{"kind": "needle", "target_tokens": [600]}]}]})
    )
    cfg = load_config(
        p,
        [
            "cma.popsize=8",
            "stages.0.generations=5",
            "server.base_url=http://h:1/v1",
            'cma.options={"CMA_diagonal": true}',
        ],
    )
    assert cfg.cma.popsize == 8 and cfg.stages[0].generations == 5 and cfg.server.base_url == "http://h:1/v1"
    assert cfg.cma.options == {"CMA_diagonal": True}
    with pytest.raises(ConfigError, match="index 3 out of range"):
        load_config(p, ["stages.3.generations=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    for shipped in Path(__file__).parents[1].glob("evolve/configs/*.json"):
        load_config(shipped)


def test_cli_help_and_bad_config(capsys, tmp_path: Path):
    from evolve.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--resume" in capsys.readouterr().out
    p = tmp_path / "c.json"
    p.write_text(
        json.dumps({"stages": [{"generations": 0, "tasks": [{"kind": "passkey", "target_tokens": [600]}]}]})
    )
    assert main(["--config", str(p)]) == 2
    assert "stages.0.generations" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Client against a local fake HTTP server


class FakeServer:
    """aiohttp app on 127.0.0.1 answering /v1/completions with a scripted list of statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []

    async def completions(self, request):
        from aiohttp import web

        self.calls += 1
        self.bodies.append(await request.json())
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.json_response(
                {
                    "error": {
                        "message": f"scripted {status}: namm_params has wrong length",
                        "type": "x",
                        "code": status,
                    }
                },
                status=status,
            )
        return web.json_response(
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "tiny",
                "choices": [{"index": 0, "text": " 12345", "finish_reason": "length", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "kv_transfer_params": {
                    "namm": {"retained_fraction": 0.25, "evicted_blocks": 3, "logical_blocks": 4}
                },
            }
        )

    async def __aenter__(self) -> str:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)

        async def health(_request):
            return web.Response(text="")

        async def models(_request):
            return web.json_response(
                {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "t"}]}
            )

        app.router.add_get("/health", health)
        app.router.add_get("/v1/models", models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def _server_cfg(url: str, **kw: Any) -> ServerConfig:
    """Client settings for the in-process fake server. Nothing here can flake on a slow machine:
    the retries answer scripted statuses (their count is exact), the backoffs only shorten the
    test, ``check()`` asks ``/health`` once before it looks at its deadline (so 0.2 s only
    bounds the unreachable case, where the port refuses at once), and the request time-out
    only bounds a hang."""
    return ServerConfig(
        base_url=url, retries=2, backoff_s=0.01, backoff_max_s=0.05, timeout_s=120, health_timeout_s=0.2, **kw
    )


def test_client_unreachable_is_one_clear_error():
    async def go() -> None:
        url = f"http://127.0.0.1:{free_port()}/v1"
        async with EvalClient(_server_cfg(url, model="tiny")) as c:
            with pytest.raises(ServerUnreachableError, match=r"after 3 attempts"):
                await c.complete("p", 4, {"kv_eviction": "none"})
            with pytest.raises(ServerUnreachableError, match="not healthy"):
                await c.check()

    asyncio.run(go())


def test_client_retries_5xx_then_succeeds():
    async def go() -> None:
        fake = FakeServer([500, 503])
        async with fake as url, EvalClient(_server_cfg(url)) as c:
            assert await c.check() == "tiny"
            r = await c.complete("p", 4, {"kv_eviction": "namm", "namm_params": [0.0, 1.0]})
            assert r.ok and r.text == " 12345" and r.attempts == 3 and r.retained_fraction == 0.25
            assert fake.calls == 3
            assert fake.bodies[-1]["vllm_xargs"] == {"kv_eviction": "namm", "namm_params": [0.0, 1.0]}

    asyncio.run(go())


def test_client_persistent_failure_counted_with_warning(caplog):
    async def go() -> GenerationResult:
        async with FakeServer([500] * 10) as url, EvalClient(_server_cfg(url, model="tiny")) as c:
            r = await c.complete("p", 4, {"kv_eviction": "none"})
            assert c.failures == 1
            return r

    with caplog.at_level(logging.WARNING, logger="evolve"):
        r = asyncio.run(go())
    assert not r.ok and r.text is None and "HTTP 500" in (r.error or "")
    assert any("counted as a failure" in rec.message for rec in caplog.records)


def test_client_400_names_the_setting():
    async def go() -> None:
        async with FakeServer([400]) as url, EvalClient(_server_cfg(url, model="tiny")) as c:
            with pytest.raises(BadSettingError, match=r"namm_params=<3 values>.*wrong length"):
                await c.complete("p", 4, {"kv_eviction": "namm", "namm_params": [1.0, 2.0, 3.0]})

    asyncio.run(go())


def test_retained_fraction_parsing():
    assert retained_fraction_of(None) == 1.0
    assert retained_fraction_of({"namm": None}) == 1.0
    assert retained_fraction_of({"namm": {"retained_fraction": 0.3}}) == 0.3


def test_baseline_cache_roundtrip(tmp_path: Path):
    c = BaselineCache(tmp_path / "b.json")
    assert c.get("m", "prompt", 8) is None
    c.put("m", "prompt", 8, " 42")
    c.save()
    c2 = BaselineCache(tmp_path / "b.json")
    assert c2.get("m", "prompt", 8) == " 42"
    assert c2.get("m", "prompt", 9) is None and c2.get("other", "prompt", 8) is None
    assert baseline_key("m", "p", 8) != baseline_key("m", "p", 8, 0.5)


# --------------------------------------------------------------------------------------------------
# The loop, with a deterministic fake client (no HTTP)


class FakeClient:
    """Full cache answers every passkey; a candidate answers it iff sum(params[:8]) > -0.05, and keeps
    a parameter-dependent KV fraction. Deterministic, so runs are exactly reproducible."""

    def __init__(self) -> None:
        self.requests = 0

    async def check(self) -> str:
        return "fake-model"

    async def truncate_middle(self, prompt: str, max_tokens: int) -> str:
        return prompt

    async def complete(
        self, prompt: str, max_tokens: int, xargs: dict[str, Any], temperature: float = 0.0
    ) -> GenerationResult:
        self.requests += 1
        key = re.search(r"The pass key is (\d+)", prompt).group(1)  # type: ignore[union-attr]
        if xargs["kv_eviction"] == "none":
            return GenerationResult(text=f" {key}.")
        p = np.asarray(xargs["namm_params"])
        good = p[:8].sum() > -0.05
        kept = float(1 / (1 + np.exp(p[8:16].sum())))
        return GenerationResult(text=f" {key}" if good else " 0", retained_fraction=kept)


def _fake_run_config(tmp_path: Path, generations: int, out: str = "run") -> Any:
    from vllm_namm.scorers import ScorerConfig
    from vllm_namm.weights import NammWeights, save_weights

    wpath = tmp_path / "start.safetensors"
    if not wpath.exists():
        start = NammWeights.zeros(ScorerConfig(kind="mlp", hidden=4, mlp_layers=1))  # small: fast CMA
        assert start.params.numel() > 16
        save_weights(wpath, start)
    return validate_config(
        {
            "cma": {"popsize": 4, "sigma0": 0.1, "seed": 5},
            "stages": [
                {
                    "generations": generations,
                    "tasks": [{"kind": "passkey", "target_tokens": [300], "max_tokens": 8, "pool_size": 6}],
                }
            ],
            "samples_per_task": 2,
            "retained_penalty": 0.1,
            "start_weights": str(wpath),
            "out_dir": str(tmp_path / out),
        }
    )


def _run(cfg: Any, resume: bool = False) -> dict[str, Any]:
    from evolve.loop import Evolution

    return asyncio.run(Evolution(cfg, FakeClient(), resume=resume, progress=False).run())


def test_loop_checkpoint_resume_is_bit_identical(tmp_path: Path):
    from evolve.loop import CHECKPOINT, RunState
    from vllm_namm.weights import load_weights

    straight = _run(_fake_run_config(tmp_path, 3, out="straight"))
    _run(_fake_run_config(tmp_path, 2, out="split"))
    split = tmp_path / "split"
    before, _ = RunState.load(split / CHECKPOINT)
    # the checkpoint restores the CMA state exactly
    again, _ = RunState.load(split / CHECKPOINT)
    np.testing.assert_array_equal(before.strategy.mean, again.strategy.mean)
    assert before.strategy.sigma == again.strategy.sigma and before.strategy.generation == 2
    resumed = _run(_fake_run_config(tmp_path, 3, out="split"), resume=True)

    a = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        assert ra["fitness"] == rb["fitness"] and ra["sigma"] == rb["sigma"]
    sa, _ = RunState.load(tmp_path / "straight" / CHECKPOINT)
    sb, _ = RunState.load(split / CHECKPOINT)
    np.testing.assert_array_equal(sa.strategy.mean, sb.strategy.mean)
    np.testing.assert_array_equal(sa.strategy.es.sm.C, sb.strategy.es.sm.C)
    assert straight["fitness"] == resumed["fitness"]

    # artefacts: weights file the server can load, curve, summary, baseline cache
    w = load_weights(split / "best.safetensors")
    assert w.provenance is not None and w.provenance.generations == 3
    assert w.provenance.fitness == resumed["fitness"]
    assert (split / "curve.png").stat().st_size > 0
    assert json.loads((split / "summary.json").read_text())["generations"] == 3
    assert len(BaselineCache(split / "baseline_cache.json")) > 0
    rec = b[-1]
    assert (
        rec["requests"] >= 2 * (4 + 1)
        and rec["retained_fraction"] is not None
        and rec["mean_candidate"] is not None
    )


def test_loop_refuses_to_overwrite_and_checks_resume_config(tmp_path: Path):
    from evolve.loop import Evolution

    cfg = _fake_run_config(tmp_path, 1)
    _run(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        _run(cfg)
    changed = cfg.model_copy(update={"samples_per_task": 3})
    with pytest.raises(ConfigError, match="samples_per_task"):
        _run(changed, resume=True)
    default = Evolution(cfg.model_copy(update={"start_weights": None}), FakeClient())
    assert default.cfg.start_weights is not None and default.cfg.start_weights.name == DEFAULT_WEIGHTS.name
    assert not default.space.x0(zeros=True).any() and default.space.dim == default.space.x0().size


def test_answer_mean_logprob_reads_the_answer_tokens():
    from evolve.client import ServerRequestError, answer_mean_logprob

    lps = [
        None,
        {"5": {"logprob": -9.0}},
        {"7": {"logprob": -1.0}, "3": {"logprob": -0.1, "rank": 1}},
        {"8": {"logprob": -3.0}},
    ]
    assert answer_mean_logprob(lps, [7, 8]) == pytest.approx(-2.0)
    with pytest.raises(ServerRequestError, match="lack the answer token"):
        answer_mean_logprob(lps, [4, 8])
    with pytest.raises(ServerRequestError, match="no prompt_logprobs"):
        answer_mean_logprob(None, [7])


class FakeLogprobClient(FakeClient):
    """Log-likelihood fitness: the answer's probability falls with how little of the cache a candidate keeps."""

    async def answer_logprob(self, prompt: str, answer: str, xargs: dict[str, Any]) -> GenerationResult:
        self.requests += 1
        assert prompt.endswith("The pass key is") and answer.startswith(" ") and answer[1:].isdigit()
        if xargs["kv_eviction"] == "none":
            return GenerationResult(text=repr(-0.1))
        assert xargs.get("kv_eviction_ratio") == 0.3
        p = np.asarray(xargs["namm_params"])
        return GenerationResult(text=repr(-0.1 - float(np.abs(p[:8]).sum())), retained_fraction=0.3)


def test_loglik_fitness_is_graded_and_normalised(tmp_path: Path):
    from evolve.loop import Evolution

    cfg = _fake_run_config(tmp_path, 2).model_copy(
        update={"fitness": "loglik", "budget_ratio": 0.3, "retained_penalty": 0.0}
    )
    client = FakeLogprobClient()
    summary = asyncio.run(Evolution(cfg, client, progress=False).run())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    fits = [f for rec in log for f in rec["fitness"]]
    assert all(0 < f < 1 for f in fits) and len(set(fits)) > 1  # graded, below the full cache's 1.0
    assert summary["fitness"] is not None


def test_output_layer_space_keeps_the_rest_fixed(tmp_path: Path):
    import torch

    from evolve.config import ExtraParamsConfig
    from evolve.params import ParamSpace
    from vllm_namm.scorers import ScorerConfig
    from vllm_namm.weights import NammWeights, load_weights

    start = NammWeights.zeros(ScorerConfig(kind="mlp", input_dim=25, hidden=25, mlp_layers=2))
    start.params = torch.randn(start.params.numel())
    space = ParamSpace(start, ExtraParamsConfig(scorer_layers="output", evolve_threshold=True))
    assert space.dim == 25 + 1 + 1  # output weights, its bias, the threshold
    x = space.x0()
    np.testing.assert_allclose(x[:-1], start.params[-26:].double().numpy())
    x[:26] = np.arange(26.0)
    params, _, threshold = space.split(x)
    full = start.params.double().numpy()
    np.testing.assert_array_equal(params[:-26], full[:-26])  # hidden layers untouched
    np.testing.assert_array_equal(params[-26:], np.arange(26.0))
    assert len(space.xargs(x)["namm_params"]) == full.size and threshold == x[-1]
    out = load_weights(
        space.export(
            tmp_path / "w.safetensors",
            x,
            base_model=None,
            stages=[],
            generations=1,
            fitness=None,
            retained_fraction=None,
        )
    )
    np.testing.assert_allclose(out.params.double().numpy(), params, rtol=1e-6)
    assert ParamSpace(start, ExtraParamsConfig()).dim == full.size


def test_evaluate_start_exports_the_best_paired_advantage(tmp_path: Path):
    cfg = _fake_run_config(tmp_path, 3).model_copy(update={"evaluate_start": True})
    summary = _run(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for rec in log:
        assert rec["start_candidate"] is not None
        assert rec["mean_advantage"] == pytest.approx(rec["mean_candidate"] - rec["start_candidate"])
    best = max(log, key=lambda r: r["mean_advantage"])
    stage = summary["stages"][0]
    assert stage["advantage_over_start"] == pytest.approx(best["mean_advantage"])
    assert stage["generation"] == best["generation"] and summary["fitness"] == best["mean_candidate"]
