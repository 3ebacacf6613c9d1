"""``python -m benchmarks``: the dispatcher's help, mode parsing, and a minimal real serving run.

The serving run starts two real ``vllm serve`` processes (none, streaming at a 256-token
budget) on a tiny random Llama and checks what the benchmark exists to show: with
eviction, each request holds far fewer KV blocks for the same workload. That check reads
counters the servers report after the run (the retained-fraction histogram and the freed
blocks, both counted from the block tables the scheduler holds), never a ``/metrics`` sample
caught mid-run: a loaded API server was seen to answer no scrape for the whole 21 s that
streaming took to decode 4 x 8192 tokens (issue 31). vLLM's own KV gauge mid-decode is checked
by ``test_engine_server.py`` on a request held at a decode position.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serving import Mode, parse_metrics

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmarks(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m benchmarks ARGS``; the time-out bounds a hang only (imports on a busy machine)."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_help_lists_commands():
    r = _run_benchmarks("--help")
    assert r.returncode == 0, r.stderr
    for name in ("serving", "quality", "kernels", "train-model"):
        assert name in r.stdout
    for name in ("serving", "quality"):
        sub = _run_benchmarks(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "--out" in sub.stdout
    assert _run_benchmarks("no-such-command").returncode == 2


def test_mode_parsing():
    m = Mode.parse("h2o:budget=1024,interval=256")
    assert m.server_flags() == [
        "--kv-eviction",
        "h2o",
        "--kv-eviction-budget",
        "1024",
        "--kv-eviction-interval",
        "256",
    ]
    assert Mode.parse("none").server_flags() == []  # the baseline is plain vLLM
    assert Mode.parse("l2:ratio=0.25,selection=token,page_rule=majority,page_score=max").server_flags() == [
        "--kv-eviction",
        "l2",
        "--kv-eviction-ratio",
        "0.25",
        "--kv-eviction-selection",
        "token",
        "--kv-eviction-page-rule",
        "majority",
        "--kv-eviction-page-score",
        "max",
    ]
    assert Mode.parse("h2o:ratio=0.25,watermark=0.05").server_flags()[-2:] == ["--watermark", "0.05"]
    assert Mode.parse("none:block=128").server_flags() == ["--block-size", "128"]  # vLLM's own flag
    assert Mode.parse("namm:granularity=layer,layer_budget=pyramid").server_flags()[2:] == [
        "--kv-eviction-granularity",
        "layer",
        "--kv-eviction-layer-budget",
        "pyramid",
    ]
    for bad in ("foo", "streaming:ratio", "streaming:size=3", "none:ratio=0.5"):
        with pytest.raises(ValueError):
            Mode.parse(bad)


def test_parse_metrics_sums_labels():
    text = (
        '# HELP x\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm_namm:retained_fraction_sum 1.5\nvllm:num_requests_running{engine="0"} 3.0\n'
    )
    m = parse_metrics(text)
    assert m["vllm:kv_cache_usage_perc"] == 0.25
    assert m["vllm_namm:retained_fraction_sum"] == 1.5
    assert m["vllm:num_requests_running"] == 3


@pytest.mark.server
@pytest.mark.timeout(1800)
def test_serving_benchmark_streaming_uses_fewer_blocks(tmp_path, tiny_model, server_pool):
    if shutil.which("vllm", path=str(Path(sys.executable).parent)) is None and shutil.which("vllm") is None:
        pytest.skip("vllm not installed")
    server_pool.close()  # the benchmark starts its own servers; keep one alive at a time
    out = tmp_path / "out"
    r = _run_benchmarks(
        "serving",
        "--model",
        str(tiny_model),
        "--modes",
        "none",
        "streaming:budget=256",
        "--num-requests",
        "4",
        "--prompt-tokens",
        "3000",
        "--max-tokens",
        "8192",
        "--sample-interval",
        "0.05",
        "--out",
        str(out),
        timeout=1500,  # two server start-ups and 2 x 4 x 8192 tokens; bounds a hang only
    )
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "serving.json").read_text())
    by_mode = {m["mode"]: m for m in report["results"]}
    assert set(by_mode) == {"none", "streaming:budget=256"}
    for m in by_mode.values():
        s = m["summary"]
        assert s["output_tok_per_s"] > 0 and math.isfinite(s["output_tok_per_s"])
        assert len(m["requests"]) == 4 and all(q["output_tokens"] == 8192 for q in m["requests"])
        assert m["samples"], "no /metrics samples"
        assert Path(m["server_log"]).exists()
    none, streaming = by_mode["none"]["summary"], by_mode["streaming:budget=256"]["summary"]
    # Read after the run, from counters: none holds every block its tokens span (retained 1.0,
    # nothing freed). A streaming request spans ceil(11 192 / 32) = 350 blocks and, at its last
    # decode step, holds its 256-token budget, the sink page, at most one 512-token interval of
    # decoded tokens and the page being written: <= 28 blocks, under a tenth of what none holds.
    assert none["mean_retained_fraction"] == 1.0 and none["evicted_blocks"] == 0
    spanned = [
        -(-(q["prompt_tokens"] + q["output_tokens"]) // 32)
        for q in by_mode["streaming:budget=256"]["requests"]
    ]
    held_per_request = streaming["mean_retained_fraction"] * statistics.mean(spanned)
    assert streaming["evicting_requests"] == 4 and held_per_request <= 28, (held_per_request, streaming)
    assert streaming["evicted_blocks"] >= 4 * (min(spanned) - 28), streaming
    assert "command: python -m benchmarks serving" in report["table"]
    assert (out / "kv_usage.png").exists()


def test_quality_benchmark_reference_runner_without_a_server(tmp_path, tiny_model):
    """``quality --reference``: the same table from the HF reference runner, page-level selection."""
    out = tmp_path / "q"
    r = _run_benchmarks(
        "quality",
        "--reference",
        "--model",
        str(tiny_model),
        "--lengths",
        "700",
        "--kinds",
        "passkey",
        "--samples",
        "1",
        "--no-namm",
        "--policies",
        "streaming",
        "--ratios",
        "0.25",
        "--interval",
        "128",
        "--block-size",
        "16",
        "--out",
        str(out),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "quality.json").read_text())
    assert report["config"]["runner"] == "reference" and report["config"]["selection"] == "page"
    by = {s["setting"]: s for s in report["summaries"]}
    assert by["full"]["mean_retained_fraction"] == 1.0
    # 25 % of the 640 scored tokens in 16-token pages, plus the unscored tail and the decode tokens
    assert by["streaming@0.25"]["mean_retained_fraction"] < 0.5
    assert "HF reference runner" in report["table"]


def test_sign_test_matches_scipy():
    from scipy.stats import binomtest

    from benchmarks.quality import sign_test_p

    assert sign_test_p(0, 0) == 1.0
    for wins, losses in [(4, 4), (10, 0), (3, 9), (36, 0), (25, 4), (1, 2)]:
        expected = binomtest(wins, wins + losses, 0.5).pvalue
        assert math.isclose(sign_test_p(wins, losses), expected, rel_tol=1e-9), (wins, losses)


def _saved_quality_report(tmp_path: Path) -> Path:
    """A quality.json as a run writes it: NAMM under its file's budget (no ratio label, 0.30
    measured), baselines at 0.3 and 0.5, one-shot rows; outcomes chosen so the counts are known."""
    from benchmarks.quality import Outcome, QualityConfig, QualityReport

    cfg = QualityConfig(
        model="m",
        policies=["streaming", "l2"],
        ratios=[0.3, 0.5],
        namm_weights=None,
        namm_thresholds=[None],
        one_shot_ratios=[0.3],
        kinds=["passkey"],
        lengths=[4096],
        samples=6,
        seed_base=10**9,
        max_tokens=8,
        interval=512,
        block_size=32,
        concurrency=4,
    )
    right = {  # which of the 6 prompts each setting answers
        "full": {0, 1, 2, 3},
        "streaming@0.3": {0},
        "streaming@0.5": {0, 1},
        "l2@0.3": {0, 1, 2, 4},
        "l2@0.5": {0, 1, 2, 3},
        "namm": {0, 1, 2, 3, 5},
        "snapkv one-shot@0.3": {1},
        "namm one-shot@0.3": {0, 1},
    }
    kept = {"full": 1.0, "namm": 0.303, "streaming@0.5": 0.5, "l2@0.5": 0.5}
    outcomes = [
        Outcome(
            setting=label,
            kind="passkey",
            length=4096,
            seed=10**9 + i,
            answer="1",
            completion="1" if i in ok else "2",
            correct=float(i in ok),
            retained_fraction=kept.get(label, 0.306),
            evicted_blocks=0,
            prompt_tokens=4096,
        )
        for label, ok in right.items()
        for i in range(6)
    ]
    report = QualityReport(
        command="python -m benchmarks quality ...",
        started="t",
        server_command=[],
        server_log="",
        wall_s=1.0,
        config=cfg,
        summaries=[],
        outcomes=outcomes,
    )
    path = tmp_path / "quality.json"
    path.write_text(report.model_dump_json())
    return path


def test_quality_report_pairs_namm_with_every_baseline_at_its_measured_fraction(tmp_path):
    """``--report`` re-analyses a saved run; a NAMM row without a ratio label is paired with the
    baselines whose measured retained fraction matches its own (not those at 0.5), one-shot with
    one-shot, each with wins, losses and the sign test."""
    from benchmarks.quality import SettingSummary, main, series_of

    path = _saved_quality_report(tmp_path)
    assert main(["--report", str(path)]) == 0
    report = json.loads(path.read_text())
    pairs = {(p["setting"], p["against"]): (p["wins"], p["losses"]) for p in report["paired_namm"]}
    assert pairs == {
        ("namm", "full"): (1, 0),
        ("namm", "streaming@0.3"): (4, 0),
        ("namm", "l2@0.3"): (2, 1),
        ("namm one-shot@0.3", "full"): (0, 2),
        ("namm one-shot@0.3", "snapkv one-shot@0.3"): (1, 0),
    }
    by = {s["setting"]: s for s in report["summaries"]}
    assert by["namm"]["accuracy"] == 5 / 6 and by["l2@0.3"]["n"] == 6
    assert "NAMM paired against the full cache" in report["table"]
    assert (tmp_path / "accuracy_vs_retained.png").exists()
    series = {s["setting"]: series_of(SettingSummary.model_validate(s)) for s in report["summaries"]}
    assert series["namm"] == "namm" and series["namm one-shot@0.3"] == "namm one-shot"
    assert series["snapkv one-shot@0.3"] == "snapkv one-shot" and series["l2@0.5"] == "l2"


def test_quality_layer_pages_rows_pair_with_their_shared_rows(tmp_path):
    """``--layer-pages`` repeats every eviction row of the main server (not full, not one-shot) on a
    per-layer-page server, and each is paired with the same policy and budget on shared pages."""
    from benchmarks.quality import LAYER, QualityConfig, build_settings, main

    path = _saved_quality_report(tmp_path)
    report = json.loads(path.read_text())
    report["config"]["layer_pages"] = True
    layer_right = {"streaming@0.3 [layer]": {0, 1, 2}, "l2@0.3 [layer]": {0}, "namm [layer]": {0, 1, 2, 3, 5}}
    for label, ok in layer_right.items():
        for i in range(6):
            report["outcomes"].append(
                report["outcomes"][i] | {"setting": label, "seed": 10**9 + i, "correct": float(i in ok)}
            )
    path.write_text(json.dumps(report))
    rows = [s for s in build_settings(QualityConfig.model_validate(report["config"])) if s.group == LAYER]
    assert {s.label for s in rows} == {
        f"{p}@{r:g} [layer]" for p in ("streaming", "l2") for r in (0.3, 0.5)
    } | {"namm [layer]"}
    assert all(s.policy != "none" and "one-shot" not in s.label for s in rows)
    assert main(["--report", str(path)]) == 0
    saved = json.loads(path.read_text())
    pairs = {(p["setting"], p["against"]): (p["wins"], p["losses"]) for p in saved["paired_layer"]}
    assert pairs == {
        ("streaming@0.3 [layer]", "streaming@0.3"): (2, 0),
        ("l2@0.3 [layer]", "l2@0.3"): (0, 3),
        ("namm [layer]", "namm"): (0, 0),
    }
    assert "Per-layer pages paired against shared pages" in saved["table"]


def test_quality_one_shot_rows_for_every_named_baseline_and_namm_alone(tmp_path):
    """``--one-shot-policies`` gives each named baseline a one-shot row beside NAMM's, and
    ``--no-namm-incremental`` leaves NAMM only there (weights made for the one-shot step)."""
    from benchmarks.quality import ONE_SHOT, QualityConfig, build_settings

    saved = json.loads(_saved_quality_report(tmp_path).read_text())["config"]
    cfg = QualityConfig.model_validate(saved | {"one_shot_policies": ["snapkv", "h2o"], "namm_ratios": [0.3]})
    default = {s.label for s in build_settings(cfg) if s.policy == "namm"}
    assert default == {"namm", "namm@0.3", "namm one-shot@0.3"}
    rows = {s.label: s for s in build_settings(cfg.model_copy(update={"namm_incremental": False}))}
    one_shot = {label for label, s in rows.items() if s.group == ONE_SHOT}
    assert one_shot == {"snapkv one-shot@0.3", "h2o one-shot@0.3", "namm one-shot@0.3"}
    assert [label for label, s in rows.items() if s.policy == "namm"] == ["namm one-shot@0.3"]
    assert "l2@0.3" in rows and "full" in rows


def test_quality_report_names_an_unreadable_file(tmp_path, capsys):
    from benchmarks.quality import main

    bad = tmp_path / "quality.json"
    bad.write_text("{not json")
    assert main(["--report", str(bad)]) == 2
    assert "cannot read the report" in capsys.readouterr().err


def _serving_config(**update):
    """A serving run's config: two modes, 40 usable blocks of 32, 1 KiB of KV per token, 1 MiB of weights."""
    from benchmarks.serving import ServingConfig

    fields = dict(
        model="m",
        modes=["none", "namm"],
        num_requests=2,
        prompt_tokens=100,
        max_tokens=8,
        request_rate=math.inf,
        kv_capacity_requests=4,
        num_blocks=41,
        kv_space_gib=1,
        block_size=32,
        max_model_len=256,
        task_kinds=["passkey"],
        seed=10**9,
        sample_interval_s=0.2,
        kv_bytes_per_token=1024,
        weights_bytes=2**20,
    )
    return ServingConfig(**(fields | update))


def _record(index: int, correct: float | None, error: str | None = None):
    from benchmarks.serving import RequestRecord

    return RequestRecord(
        index=index,
        sent_s=0.0,
        ttft_s=1.0,
        e2e_s=2.0,
        prompt_tokens=100,
        output_tokens=8,
        tpot_s=0.1,
        error=error,
        answer_text=None if correct is None else "x",
        correct=correct,
    )


def test_serving_summary_scores_answers_and_sizes_the_kv_per_request():
    """Accuracy counts a failed request as wrong; KV per running request = mean blocks in use /
    mean requests running x block bytes; the modelled memory-bound ratio follows its formula."""
    from benchmarks.serving import Sample, memory_bound_ratio, summarise

    samples = [
        Sample(t_s=t, kv_usage=0.5, kv_blocks=blocks, running=run, waiting=0)
        for t, blocks, run in [(0.0, 40.0, 4), (1.0, 40.0, 4)]
    ]
    records = [_record(0, 1.0), _record(1, 0.0), _record(2, 1.0), _record(3, 1.0, error="HTTP 500")]
    s = summarise(records, samples, {}, wall=10.0, kv_bytes_per_token=1024, block_size=32)
    assert s.accuracy == 0.5
    assert s.kv_mib_per_request == 10 * 32 * 1024 / 2**20
    unscored = summarise([_record(0, None)], samples, {}, wall=1.0)
    assert unscored.accuracy is None and unscored.kv_mib_per_request is None
    cfg = _serving_config()
    more = s.model_copy(update={"mean_running": 12.0, "kv_mib_per_request": s.kv_mib_per_request / 4})
    rate = lambda r, kv: r / (2**20 + r * kv * 2**20)  # noqa: E731
    expected = rate(12.0, s.kv_mib_per_request / 4) / rate(4.0, s.kv_mib_per_request)
    assert math.isclose(memory_bound_ratio(more, s, cfg), expected)
    assert memory_bound_ratio(more, s, cfg.model_copy(update={"weights_bytes": None})) is None


def test_kv_bytes_per_token_reads_the_config(tmp_path):
    from benchmarks.serving import kv_bytes_per_token

    (tmp_path / "config.json").write_text(
        json.dumps(
            {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
        )
    )
    assert kv_bytes_per_token(tmp_path) == 2 * 30 * 3 * 64 * 4
    assert kv_bytes_per_token(tmp_path / "missing") is None


def test_serving_realtext_bad_input_is_one_line(tmp_path, capsys):
    from benchmarks.serving import main

    assert (
        main(["--tasks", "realtext", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]
    assert not (tmp_path / "o").exists()


def test_serving_table_shows_accuracy_and_the_modelled_line_only_when_measured():
    from benchmarks.serving import ModeResult, Sample, ServingReport, format_table, summarise

    cfg = _serving_config(tasks="realtext", task_kinds=["niah_number"])

    def result(mode: str, running: int, blocks: float, right: list[float | None]) -> ModeResult:
        samples = [Sample(t_s=0.0, kv_usage=0.5, kv_blocks=blocks, running=running, waiting=0)]
        records = [_record(i, c) for i, c in enumerate(right)]
        return ModeResult(
            mode=mode,
            policy=mode,
            server_command=[],
            server_log="",
            startup_s=1.0,
            total_blocks=40,
            summary=summarise(records, samples, {}, 1.0, cfg.kv_bytes_per_token, cfg.block_size),
            requests=records,
            samples=samples,
        )

    table = format_table(
        ServingReport(
            command="c",
            started="t",
            config=cfg,
            results=[result("none", 2, 40.0, [1.0, 1.0]), result("namm", 4, 20.0, [1.0, 0.0])],
        )
    )
    assert "| accuracy" in table and "0.500 (0.50x)" in table
    assert "modelled memory-bound tok/s vs none" in table and "modelled (not measured)" in table
    synthetic = cfg.model_copy(update={"tasks": "synthetic", "weights_bytes": None})
    plain = format_table(
        ServingReport(
            command="c",
            started="t",
            config=synthetic,
            results=[result("none", 2, 40.0, [None, None]), result("namm", 4, 20.0, [None, None])],
        )
    )
    assert "accuracy" not in plain and "modelled" not in plain


def test_bench_serve_prints_ratios_to_each_none_run():
    """`none` at vLLM's block and `none:block=32` each get a table: the block's price apart from eviction's."""
    from benchmarks.bench_serve import format_tables

    def run(mode: str, tok_s: float, block: str) -> dict:
        return {
            "mode": mode,
            "output_throughput": tok_s,
            "completed": 4,
            "evicted_blocks": 0.0,
            "block_size": block,
        }

    text = format_tables([run("none", 20.0, "128"), run("none:block=32", 10.0, "32"), run("namm", 9.0, "32")])
    first, second = text.split("ratios to `none:block=32`")
    assert "ratios to `none` (block 128)" in first and "9.0 (0.45x)" in first and "10.0 (0.50x)" in first
    assert "(block 32)" in second and "9.0 (0.90x)" in second and "20.0 (2.00x)" in second
    alone = format_tables([run("namm", 9.0, "32")])
    assert "no ratios" in alone and "x)" not in alone
