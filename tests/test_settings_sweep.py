"""Every plugin flag and every per-request key with bad values (issue 16).

Start-up: each case must stop ``vllm serve`` with exactly one ``vllm-namm: error:`` line naming
the flag (exit code 2, no traceback). Type and choice errors are argparse's own, from vLLM's
parser: one ``vllm serve: error: argument --flag: ...`` line after the usage line; the table
marks those ``kind="argparse"``. The whole table runs through vLLM's real parser and
``create_engine_config`` in one process (``serve_cli_harness.py``: one vLLM import instead of
~20 s per case); a few cases are confirmed with real ``vllm serve`` runs, which must print the
same line.

Per request: each bad ``vllm_xargs`` (raw JSON bodies, so NaN and Infinity reach the server)
must be an HTTP 400 whose message names the key, on one running server, which afterwards still
answers a normal request and has logged no traceback. The same table is checked without a
server against :mod:`vllm_namm.vllm_patch.request_settings`.

The flag list and the key list come from the code (the plugin's argument group, the fields of
``RequestSettings``); a flag or key without its bad cases fails the coverage tests.

Also here: an interval longer than the model (``--kv-eviction-interval 8192 --max-model-len
4096``) is kvpress-style one-shot compression, a single eviction step at the end of the prompt.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import random
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
import pytest
import requests
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from servers import ServerPool, VllmServer, complete, engine_errors, namm_summary, run_vllm_fail, text

from vllm_namm.config import EvictionConfig
from vllm_namm.vllm_patch.cli import FLAGS, add_flags
from vllm_namm.vllm_patch.request_settings import (
    RequestSettings,
    RequestSettingsError,
    parse_request_settings,
    validate_for_server,
)

HERE = Path(__file__).parent
GROUP_TITLE = "vllm-namm KV eviction"


# ---------------------------------------------------------------------------------------------
# start-up flags
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlagCase:
    id: str
    flags: tuple[str, ...]
    subject: str
    """The flag the error line must name."""
    category: str
    """range | type | nonfinite | conflict | choice | file | platform"""
    needle: str
    kind: str = "ours"
    """ours: one ``vllm-namm: error:`` line; argparse: one ``vllm serve: error: argument`` line."""
    cpu_only: bool = False

    @property
    def flag(self) -> str:
        """The flag this case is about (a file path subject: the flag that took it)."""
        return (
            self.subject if self.subject.startswith("--") else self.flags[self.flags.index(self.subject) - 1]
        )


def _c(id_: str, flags: list[str], subject: str, category: str, needle: str, **kw: Any) -> FlagCase:
    return FlagCase(id_, tuple(flags), subject, category, needle, **kw)


NAMM = ["--kv-eviction", "namm"]
STREAM = ["--kv-eviction", "streaming"]
STREAM_B = [*STREAM, "--kv-eviction-budget", "256"]
ONLY_WITH_POLICY = "no effect without --kv-eviction POLICY"

FLAG_CASES: list[FlagCase] = [
    # --kv-eviction
    _c(
        "policy-bogus",
        ["--kv-eviction", "bogus"],
        "--kv-eviction",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    _c(
        "policy-case", ["--kv-eviction", "NAMM"], "--kv-eviction", "choice", "invalid choice", kind="argparse"
    ),
    _c("streaming-without-budget", STREAM, "--kv-eviction", "conflict", "needs --kv-eviction-budget"),
    _c(
        "pipeline-lag-0",
        [*NAMM, "--pipeline-parallel-size", "2", "--kv-eviction-lag", "0"],
        "--pipeline-parallel-size",
        "conflict",
        "does not support --pipeline-parallel-size",
    ),
    _c(
        "context-parallel",
        [*NAMM, "--decode-context-parallel-size", "2"],
        "--decode-context-parallel-size",
        "conflict",
        "split each request's tokens",
    ),
    _c(
        "scheduler-cls",
        [*NAMM, "--scheduler-cls", "my.Scheduler"],
        "--scheduler-cls",
        "conflict",
        "replaces the scheduler",
    ),
    # --namm-weights
    _c(
        "weights-missing", [*NAMM, "--namm-weights", "{missing}"], "{missing}", "file", "no such weights file"
    ),
    _c(
        "weights-directory",
        [*NAMM, "--namm-weights", "{directory}"],
        "{directory}",
        "file",
        "no such weights file",
    ),
    _c(
        "weights-corrupt",
        [*NAMM, "--namm-weights", "{corrupt}"],
        "{corrupt}",
        "file",
        "not a safetensors file",
    ),
    _c(
        "weights-model-file",
        [*NAMM, "--namm-weights", "{model_file}"],
        "{model_file}",
        "file",
        "not a NAMM weights file",
    ),
    _c(
        "weights-nan-threshold",
        [*NAMM, "--namm-weights", "{nan_threshold}"],
        "{nan_threshold}",
        "nonfinite",
        "finite number",
    ),
    _c(
        "weights-with-streaming",
        [*STREAM_B, "--namm-weights", "{missing}"],
        "--namm-weights",
        "conflict",
        "only applies to --kv-eviction namm",
    ),
    # --namm-threshold
    _c("threshold-nan", [*NAMM, "--namm-threshold", "nan"], "--namm-threshold", "nonfinite", "finite number"),
    _c("threshold-inf", [*NAMM, "--namm-threshold", "inf"], "--namm-threshold", "nonfinite", "finite number"),
    _c(
        "threshold-minus-inf",
        [*NAMM, "--namm-threshold=-inf"],
        "--namm-threshold",
        "nonfinite",
        "finite number",
    ),
    _c(
        "threshold-abc",
        [*NAMM, "--namm-threshold", "abc"],
        "--namm-threshold",
        "type",
        "invalid float value",
        kind="argparse",
    ),
    _c(
        "threshold-with-streaming",
        [*STREAM_B, "--namm-threshold", "0.5"],
        "--namm-threshold",
        "conflict",
        "only applies to --kv-eviction namm",
    ),
    # --kv-eviction-interval
    _c(
        "interval-abc",
        [*NAMM, "--kv-eviction-interval", "abc"],
        "--kv-eviction-interval",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "interval-fraction",
        [*NAMM, "--kv-eviction-interval", "512.5"],
        "--kv-eviction-interval",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "interval-0",
        [*NAMM, "--kv-eviction-interval", "0"],
        "--kv-eviction-interval",
        "range",
        "greater than 0",
    ),
    _c(
        "interval-negative",
        [*NAMM, "--kv-eviction-interval", "-16"],
        "--kv-eviction-interval",
        "range",
        "greater than 0",
    ),
    _c(
        "interval-not-hop",
        [*NAMM, "--kv-eviction-interval", "500"],
        "--kv-eviction-interval",
        "range",
        "multiple of 16",
    ),
    # --kv-eviction-budget
    _c(
        "budget-abc",
        [*STREAM, "--kv-eviction-budget", "abc"],
        "--kv-eviction-budget",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "budget-fraction",
        [*STREAM, "--kv-eviction-budget", "1.5"],
        "--kv-eviction-budget",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c("budget-0", [*STREAM, "--kv-eviction-budget", "0"], "--kv-eviction-budget", "range", "greater than 0"),
    _c(
        "budget-negative",
        [*STREAM, "--kv-eviction-budget", "-5"],
        "--kv-eviction-budget",
        "range",
        "greater than 0",
    ),
    _c(
        "budget-below-sinks",
        [*STREAM, "--kv-eviction-budget", "3"],
        "--kv-eviction-budget",
        "range",
        "must exceed streaming_sinks",
    ),
    _c(
        "threshold-with-budget",
        [*NAMM, "--kv-eviction-budget", "256", "--namm-threshold", "0.5"],
        "--namm-threshold",
        "conflict",
        "a threshold does not apply",
    ),
    _c(
        "budget-and-ratio",
        [*STREAM_B, "--kv-eviction-ratio", "0.5"],
        "--kv-eviction-budget",
        "conflict",
        "not both",
    ),
    # --kv-eviction-ratio
    _c(
        "ratio-abc",
        [*STREAM, "--kv-eviction-ratio", "abc"],
        "--kv-eviction-ratio",
        "type",
        "invalid float value",
        kind="argparse",
    ),
    _c("ratio-0", [*STREAM, "--kv-eviction-ratio", "0"], "--kv-eviction-ratio", "range", "greater than 0"),
    _c(
        "ratio-1.5",
        [*STREAM, "--kv-eviction-ratio", "1.5"],
        "--kv-eviction-ratio",
        "range",
        "less than or equal to 1",
    ),
    _c(
        "ratio-negative",
        [*STREAM, "--kv-eviction-ratio=-0.5"],
        "--kv-eviction-ratio",
        "range",
        "greater than 0",
    ),
    _c(
        "ratio-nan",
        [*STREAM, "--kv-eviction-ratio", "nan"],
        "--kv-eviction-ratio",
        "nonfinite",
        "finite number",
    ),
    _c(
        "ratio-inf",
        [*STREAM, "--kv-eviction-ratio", "inf"],
        "--kv-eviction-ratio",
        "nonfinite",
        "finite number",
    ),
    _c(
        "ratio-with-l2-and-budget",
        ["--kv-eviction", "l2", "--kv-eviction-budget", "256", "--kv-eviction-ratio", "0.5"],
        "--kv-eviction-budget",
        "conflict",
        "not both",
    ),
    _c(
        "ratio-with-none",
        ["--kv-eviction-ratio", "0.5"],
        "--kv-eviction-ratio",
        "conflict",
        "no effect without",
    ),
    # --kv-eviction-sink-tokens
    _c(
        "sinks-abc",
        [*STREAM_B, "--kv-eviction-sink-tokens", "abc"],
        "--kv-eviction-sink-tokens",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "sinks-negative",
        [*STREAM_B, "--kv-eviction-sink-tokens", "-1"],
        "--kv-eviction-sink-tokens",
        "range",
        "greater than or equal to 0",
    ),
    # --kv-eviction-recent-tokens
    _c(
        "recent-abc",
        [*NAMM, "--kv-eviction-recent-tokens", "abc"],
        "--kv-eviction-recent-tokens",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "recent-0",
        [*NAMM, "--kv-eviction-recent-tokens", "0"],
        "--kv-eviction-recent-tokens",
        "range",
        "greater than or equal to 1",
    ),
    _c(
        "recent-negative",
        [*NAMM, "--kv-eviction-recent-tokens", "-4"],
        "--kv-eviction-recent-tokens",
        "range",
        "greater than or equal to 1",
    ),
    # --kv-eviction-page-rule
    _c(
        "page-rule-bogus",
        [*NAMM, "--kv-eviction-page-rule", "most"],
        "--kv-eviction-page-rule",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    # --namm-kernels
    _c(
        "kernels-bogus",
        [*NAMM, "--namm-kernels", "cuda"],
        "--namm-kernels",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    _c(
        "kernels-triton-on-cpu",
        [*NAMM, "--namm-kernels", "triton"],
        "--namm-kernels",
        "platform",
        "needs a CUDA or ROCm GPU",
        cpu_only=True,
    ),
    # --kv-eviction-selection, --kv-eviction-page-score
    _c(
        "selection-bogus",
        [*STREAM_B, "--kv-eviction-selection", "pages"],
        "--kv-eviction-selection",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    _c(
        "page-score-bogus",
        [*STREAM_B, "--kv-eviction-page-score", "min"],
        "--kv-eviction-page-score",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    # --kv-eviction-granularity, --kv-eviction-layer-budget
    _c(
        "granularity-bogus",
        [*STREAM_B, "--kv-eviction-granularity", "head"],
        "--kv-eviction-granularity",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    _c(
        "layer-budget-bogus",
        [*STREAM_B, "--kv-eviction-granularity", "layer", "--kv-eviction-layer-budget", "cone"],
        "--kv-eviction-layer-budget",
        "choice",
        "invalid choice",
        kind="argparse",
    ),
    _c(
        "layer-budget-shared-pages",
        [*STREAM_B, "--kv-eviction-layer-budget", "pyramid"],
        "--kv-eviction-layer-budget",
        "conflict",
        "needs granularity 'layer'",
    ),
    _c(
        "layer-budget-token-selection",
        [
            *STREAM_B,
            "--kv-eviction-granularity",
            "layer",
            "--kv-eviction-layer-budget",
            "pyramid",
            "--kv-eviction-selection",
            "token",
        ],
        "--kv-eviction-layer-budget",
        "conflict",
        "needs page-level selection",
    ),
    # --kv-eviction-lag
    _c(
        "lag-negative",
        [*NAMM, "--kv-eviction-lag", "-1"],
        "--kv-eviction-lag",
        "range",
        "greater than or equal to 0",
    ),
    _c(
        "lag-huge",
        [*NAMM, "--kv-eviction-lag", "65"],
        "--kv-eviction-lag",
        "range",
        "less than or equal to 64",
    ),
    _c(
        "lag-abc",
        [*NAMM, "--kv-eviction-lag", "abc"],
        "--kv-eviction-lag",
        "type",
        "invalid int value",
        kind="argparse",
    ),
    _c(
        "prefix-cache-negative",
        [*NAMM, "--kv-eviction-prefix-cache-mib", "-1"],
        "--kv-eviction-prefix-cache-mib",
        "range",
        "greater than or equal to 0",
    ),
    _c(
        "prefix-cache-nan",
        [*NAMM, "--kv-eviction-prefix-cache-mib", "nan"],
        "--kv-eviction-prefix-cache-mib",
        "nonfinite",
        "finite number",
    ),
    _c(
        "prefix-cache-abc",
        [*NAMM, "--kv-eviction-prefix-cache-mib", "abc"],
        "--kv-eviction-prefix-cache-mib",
        "type",
        "invalid float value",
        kind="argparse",
    ),
]

# A valid value of each flag: given without a policy (--kv-eviction none), each is a conflict.
VALID_VALUE = {
    "--namm-weights": "{missing}",
    "--namm-threshold": "0.5",
    "--kv-eviction-interval": "1024",
    "--kv-eviction-budget": "256",
    "--kv-eviction-ratio": "0.5",
    "--kv-eviction-sink-tokens": "4",
    "--kv-eviction-recent-tokens": "8",
    "--kv-eviction-page-rule": "any",
    "--namm-kernels": "torch",
    "--kv-eviction-lag": "0",
    "--kv-eviction-prefix-cache-mib": "64",
    "--kv-eviction-selection": "token",
    "--kv-eviction-page-score": "mean",
    "--kv-eviction-granularity": "layer",
    "--kv-eviction-layer-budget": "pyramid",
}
FLAG_CASES += [
    _c(f"{flag.lstrip('-')}-without-policy", [flag, value], flag, "conflict", ONLY_WITH_POLICY)
    for flag, value in VALID_VALUE.items()
]

# The same flags must pass when a policy is given (so the cases above fail for the stated reason).
GOOD_FLAGS: dict[str, list[str]] = {
    "namm-all-flags": [
        *NAMM,
        "--namm-threshold",
        "0.5",
        "--kv-eviction-interval",
        "1024",
        "--kv-eviction-recent-tokens",
        "8",
        "--kv-eviction-sink-tokens",
        "4",
        "--kv-eviction-page-rule",
        "any",
        "--namm-kernels",
        "torch",
        "--kv-eviction-lag",
        "0",
        "--kv-eviction-prefix-cache-mib",
        "0",
    ],
    "streaming-budget": STREAM_B,
    "namm-budget": [*NAMM, "--kv-eviction-ratio", "0.3"],
    "streaming-token-selection": [
        *STREAM_B,
        "--kv-eviction-selection",
        "token",
        "--kv-eviction-page-score",
        "vote",
    ],
    "h2o-ratio": ["--kv-eviction", "h2o", "--kv-eviction-ratio", "0.5"],
    "h2o-layer-pyramid": [
        "--kv-eviction",
        "h2o",
        "--kv-eviction-ratio",
        "0.5",
        "--kv-eviction-granularity",
        "layer",
        "--kv-eviction-layer-budget",
        "pyramid",
    ],
    "one-shot": [*NAMM, "--max-model-len", "4096", "--kv-eviction-interval", "8192"],
    "one-shot-derived-len": [*NAMM, "--kv-eviction-interval", str(1 << 24)],  # length from the model
    "interval-512": [*NAMM, "--max-model-len", "4096"],
    "tensor-parallel-2": [*STREAM_B, "--tensor-parallel-size", "2"],
}


def plugin_actions() -> dict[str, argparse.Action]:
    """The plugin's flags, from the argument group ``add_flags`` builds (the one vLLM's parser gets)."""
    parser = argparse.ArgumentParser()
    add_flags(parser)
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    return {a.option_strings[0]: a for a in group._group_actions}


def bounded(field: FieldInfo) -> bool:
    """Whether a pydantic field has a numeric range (gt/ge/lt/le) or a fixed set of values."""
    return "Literal" in str(field.annotation) or any(
        isinstance(m, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le))
        for m in field.metadata
    )


def config_field(path: str) -> FieldInfo:
    """The EvictionConfig field at ``budget.tokens``-style ``path``."""
    model: type[BaseModel] = EvictionConfig
    *parents, leaf = path.split(".")
    for name in parents:
        ann = model.model_fields[name].annotation
        model = next(
            a for a in typing.get_args(ann) or (ann,) if isinstance(a, type) and issubclass(a, BaseModel)
        )
    return model.model_fields[leaf]


def required_flag_categories(flag: str, action: argparse.Action) -> set[str]:
    need = {"conflict"}
    if action.choices:
        need.add("choice")
    if action.type in (int, float):
        need.add("type")
        if bounded(config_field(FLAGS[flag][0])):
            need.add("range")
    if action.type is float:
        need.add("nonfinite")
    return need


def test_every_flag_has_bad_cases() -> None:
    actions = plugin_actions()
    assert set(actions) == set(FLAGS), "the flag table of cli.py and the parser group disagree"
    for flag, action in actions.items():
        have = {c.category for c in FLAG_CASES if c.flag == flag}
        missing = required_flag_categories(flag, action) - have
        assert not missing, f"{flag}: no bad case of kind {sorted(missing)} in FLAG_CASES"
    ids = [c.id for c in FLAG_CASES]
    assert len(ids) == len(set(ids))


@pytest.fixture(scope="module")
def bad_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from safetensors.torch import save_file

    from vllm_namm.weights import FORMAT_VERSION, META_KEY, NammWeights, WeightsMeta

    d = tmp_path_factory.mktemp("bad_weights")
    corrupt = d / "corrupt.safetensors"
    corrupt.write_bytes(random.Random(0).randbytes(4096))
    w = NammWeights.zeros()
    meta = WeightsMeta(
        format_version=FORMAT_VERSION, scorer=w.scorer, features=w.features, num_params=int(w.params.numel())
    )
    raw = json.loads(meta.model_dump_json())
    raw["threshold"] = float("nan")
    nan_threshold = d / "nan_threshold.safetensors"
    save_file(
        {"params": w.params, "norm_mean": w.norm_mean, "norm_std": w.norm_std},
        str(nan_threshold),
        metadata={META_KEY: json.dumps(raw)},
    )  # NaN in the JSON, as a hand-edited file could have
    return {
        "missing": str(d / "does-not-exist.safetensors"),
        "directory": str(d),
        "corrupt": str(corrupt),
        "model_file": str(tiny_model / "model.safetensors"),
        "nan_threshold": str(nan_threshold),
    }


def _fill(s: str, files: dict[str, str]) -> str:
    return s.format(**files) if s.startswith("{") else s


@pytest.fixture(scope="module")
def harness_results(
    tiny_model: Path, bad_files: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Every FLAG_CASES and GOOD_FLAGS entry through vLLM's parser and config, in one process."""
    import os

    from servers import DEFAULT_ENV

    from benchmarks.launch import ROOT

    d = tmp_path_factory.mktemp("harness")
    named = {c.id: [_fill(f, bad_files) for f in c.flags] for c in FLAG_CASES} | GOOD_FLAGS
    (d / "cases.json").write_text(json.dumps([[str(tiny_model), *flags] for flags in named.values()]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "serve_cli_harness.py"), str(d / "cases.json"), str(d / "results.json")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=dict(os.environ) | DEFAULT_ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((d / "results.json").read_text())
    return dict(zip(named, results, strict=True))


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ": error:" in ln]


def check_flag_error(case: FlagCase, rc: int | None, stderr: str, files: dict[str, str]) -> str:
    """Exit code 2, no traceback, exactly one error line naming the flag; returns that line."""
    assert "Traceback" not in stderr, f"{case.id}: traceback on stderr:\n{stderr[-4000:]}"
    assert rc == 2, f"{case.id}: exit code {rc}, expected 2\n{stderr[-3000:]}"
    lines = error_lines(stderr)
    assert len(lines) == 1, f"{case.id}: expected exactly one error line, got {lines}\n{stderr[-3000:]}"
    line = lines[0]
    prefix = "vllm-namm: error: " if case.kind == "ours" else "vllm serve: error: argument "
    assert line.startswith(prefix), f"{case.id}: {line!r} does not start with {prefix!r}"
    subject = _fill(case.subject, files)
    assert subject in line, f"{case.id}: error line does not name {subject}: {line!r}"
    assert case.needle in line, f"{case.id}: {case.needle!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case", FLAG_CASES, ids=[c.id for c in FLAG_CASES])
def test_bad_flag_gives_one_clear_line(case: FlagCase, harness_results, bad_files) -> None:
    if case.cpu_only and _on_gpu():
        pytest.skip("a GPU platform accepts this setting")
    r = harness_results[case.id]
    check_flag_error(case, r["rc"], r["stderr"], bad_files)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("name", list(GOOD_FLAGS))
def test_good_flags_pass(name: str, harness_results) -> None:
    r = harness_results[name]
    assert r["rc"] == 0 and not error_lines(r["stderr"]), r


def test_interval_longer_than_model_caps_prompt_chunks(harness_results) -> None:
    """No pydantic traceback from vLLM's SchedulerConfig: the chunk limit is the model length."""
    r = harness_results["one-shot"]
    assert (r["interval"], r["max_model_len"], r["long_prefill_token_threshold"]) == (8192, 4096, 4096), r
    derived = harness_results["one-shot-derived-len"]  # max_model_len unset in the args: the model's
    assert derived["interval"] == 1 << 24
    assert derived["long_prefill_token_threshold"] == derived["max_model_len"] < 1 << 24, derived
    normal = harness_results["interval-512"]
    assert normal["long_prefill_token_threshold"] == 512, normal


REAL_RUNS = ["threshold-nan", "interval-abc", "kv-eviction-budget-without-policy"]


@pytest.mark.server
@pytest.mark.timeout(900)
def test_real_vllm_serve_prints_the_same_line(tiny_model: Path, harness_results, bad_files) -> None:
    """``vllm serve`` itself, for a few cases: same single line as the harness, exit 2, no traceback."""
    cases = {c.id: c for c in FLAG_CASES}
    with cf.ThreadPoolExecutor(2) as ex:
        runs = dict(
            zip(
                REAL_RUNS,
                ex.map(
                    lambda i: run_vllm_fail(tiny_model, [_fill(f, bad_files) for f in cases[i].flags]),
                    REAL_RUNS,
                ),
                strict=True,
            )
        )
    for case_id, run in runs.items():
        assert run.returncode is not None, f"{case_id}: vllm serve did not exit\n{run.output[-3000:]}"
        assert "Traceback" not in run.output, f"{case_id}:\n{run.output[-4000:]}"
        line = check_flag_error(cases[case_id], run.returncode, run.stderr, bad_files)
        assert line == error_lines(harness_results[case_id]["stderr"])[0]
        # refused before the engine starts: no engine process, no model loaded (not timed: on a
        # busy 2-core machine two vllm imports side by side can take minutes)
        assert "EngineCore" not in run.output, f"{case_id}: the engine started\n{run.output[-3000:]}"


# ---------------------------------------------------------------------------------------------
# per-request vllm_xargs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class XargsCase:
    id: str
    xargs: str
    """The ``vllm_xargs`` object as raw JSON text (NaN / Infinity allowed, as Python's parser does)."""
    key: str
    """The key the 400 message must name."""
    category: str
    """range | type | nonfinite | conflict | unknown"""
    vllm_own: bool = False
    """Rejected by vLLM's request model before the plugin sees it (not checked without a server;
    vLLM's message is several lines, one per member of its value type)."""


def _x(id_: str, xargs: str, key: str, category: str, **kw: Any) -> XargsCase:
    return XargsCase(id_, xargs, key, category, **kw)


def _zeros_with(last: str) -> str:
    """A full-length namm_params vector (placeholder N is filled in) ending in ``last``."""
    return '{"namm_params": [ZEROS' + last + "]}"


# The per-request server runs --kv-eviction namm (shipped weights, threshold 0).
XARGS_CASES: list[XargsCase] = [
    # kv_eviction
    _x("policy-bogus", '{"kv_eviction": "bogus"}', "kv_eviction", "range"),
    _x("policy-int", '{"kv_eviction": 3}', "kv_eviction", "type"),
    _x("policy-list", '{"kv_eviction": ["namm"]}', "kv_eviction", "type"),
    _x("policy-bool", '{"kv_eviction": true}', "kv_eviction", "type"),
    _x("policy-h2o-without-budget", '{"kv_eviction": "h2o"}', "kv_eviction", "conflict"),
    _x("policy-null", '{"kv_eviction": null}', "vllm_xargs.kv_eviction", "type", vllm_own=True),
    # kv_eviction_budget
    _x("budget-0", '{"kv_eviction": "streaming", "kv_eviction_budget": 0}', "kv_eviction_budget", "range"),
    _x(
        "budget-negative",
        '{"kv_eviction": "streaming", "kv_eviction_budget": -3}',
        "kv_eviction_budget",
        "range",
    ),
    _x(
        "budget-below-sinks",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 3}',
        "kv_eviction_budget",
        "range",
    ),
    _x(
        "budget-abc",
        '{"kv_eviction": "streaming", "kv_eviction_budget": "abc"}',
        "kv_eviction_budget",
        "type",
    ),
    _x(
        "budget-fraction",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 1.5}',
        "kv_eviction_budget",
        "type",
    ),
    _x(
        "budget-list",
        '{"kv_eviction": "streaming", "kv_eviction_budget": [256]}',
        "kv_eviction_budget",
        "type",
    ),
    _x(
        "budget-nan",
        '{"kv_eviction": "streaming", "kv_eviction_budget": NaN}',
        "kv_eviction_budget",
        "nonfinite",
    ),
    _x(
        "budget-inf",
        '{"kv_eviction": "streaming", "kv_eviction_budget": Infinity}',
        "kv_eviction_budget",
        "nonfinite",
    ),
    _x(
        "threshold-with-budget",
        '{"kv_eviction_ratio": 0.3, "namm_threshold": 0.5}',
        "namm_threshold",
        "conflict",
    ),
    _x(
        "budget-with-none",
        '{"kv_eviction": "none", "kv_eviction_budget": 256}',
        "kv_eviction_budget",
        "conflict",
    ),
    _x(
        "budget-and-ratio",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 256, "kv_eviction_ratio": 0.5}',
        "kv_eviction_budget",
        "conflict",
    ),
    _x(
        "budget-object",
        '{"kv_eviction": "streaming", "kv_eviction_budget": {"tokens": 256}}',
        "vllm_xargs.kv_eviction_budget",
        "type",
        vllm_own=True,
    ),
    # kv_eviction_ratio
    _x("ratio-0", '{"kv_eviction": "h2o", "kv_eviction_ratio": 0}', "kv_eviction_ratio", "range"),
    _x("ratio-1.5", '{"kv_eviction": "h2o", "kv_eviction_ratio": 1.5}', "kv_eviction_ratio", "range"),
    _x("ratio-negative", '{"kv_eviction": "h2o", "kv_eviction_ratio": -0.25}', "kv_eviction_ratio", "range"),
    _x("ratio-abc", '{"kv_eviction": "h2o", "kv_eviction_ratio": "abc"}', "kv_eviction_ratio", "type"),
    _x("ratio-list", '{"kv_eviction": "h2o", "kv_eviction_ratio": [0.5]}', "kv_eviction_ratio", "type"),
    _x("ratio-nan", '{"kv_eviction": "h2o", "kv_eviction_ratio": NaN}', "kv_eviction_ratio", "nonfinite"),
    _x(
        "ratio-inf", '{"kv_eviction": "h2o", "kv_eviction_ratio": Infinity}', "kv_eviction_ratio", "nonfinite"
    ),
    _x(
        "ratio-minus-inf",
        '{"kv_eviction": "h2o", "kv_eviction_ratio": -Infinity}',
        "kv_eviction_ratio",
        "nonfinite",
    ),
    _x(
        "ratio-with-none",
        '{"kv_eviction": "none", "kv_eviction_ratio": 0.5}',
        "kv_eviction_ratio",
        "conflict",
    ),
    # namm_params
    _x("params-wrong-length", '{"namm_params": [0.0, 1.0]}', "namm_params", "range"),
    _x("params-string", '{"namm_params": "abc"}', "namm_params", "type"),
    _x("params-scalar", '{"namm_params": 5}', "namm_params", "type"),
    _x("params-strings", '{"namm_params": ["a", "b"]}', "namm_params", "type"),
    _x("params-nan", '{"namm_params": [NaN]}', "namm_params", "nonfinite"),
    _x("params-full-length-inf", _zeros_with("Infinity"), "namm_params", "nonfinite"),
    _x("params-full-length-nan", _zeros_with("NaN"), "namm_params", "nonfinite"),
    _x(
        "params-with-streaming",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 256, "namm_params": [0.0]}',
        "namm_params",
        "conflict",
    ),
    _x("params-with-none", '{"kv_eviction": "none", "namm_params": [0.0]}', "namm_params", "conflict"),
    # namm_threshold
    _x("threshold-nan", '{"namm_threshold": NaN}', "namm_threshold", "nonfinite"),
    _x("threshold-inf", '{"namm_threshold": Infinity}', "namm_threshold", "nonfinite"),
    _x("threshold-minus-inf", '{"namm_threshold": -Infinity}', "namm_threshold", "nonfinite"),
    _x("threshold-nan-string", '{"namm_threshold": "nan"}', "namm_threshold", "nonfinite"),
    _x("threshold-huge", '{"namm_threshold": 1e400}', "namm_threshold", "nonfinite"),
    _x("threshold-abc", '{"namm_threshold": "abc"}', "namm_threshold", "type"),
    _x("threshold-list", '{"namm_threshold": [0.5]}', "namm_threshold", "type"),
    _x(
        "threshold-with-streaming",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 256, "namm_threshold": 0.5}',
        "namm_threshold",
        "conflict",
    ),
    # namm_ema_coeff_per_step
    _x("ema-0", '{"namm_ema_coeff_per_step": 0}', "namm_ema_coeff_per_step", "range"),
    _x("ema-1", '{"namm_ema_coeff_per_step": 1}', "namm_ema_coeff_per_step", "range"),
    _x("ema-negative", '{"namm_ema_coeff_per_step": -0.5}', "namm_ema_coeff_per_step", "range"),
    _x("ema-nan", '{"namm_ema_coeff_per_step": NaN}', "namm_ema_coeff_per_step", "nonfinite"),
    _x("ema-abc", '{"namm_ema_coeff_per_step": "abc"}', "namm_ema_coeff_per_step", "type"),
    _x(
        "ema-with-streaming",
        '{"kv_eviction": "streaming", "kv_eviction_budget": 256, "namm_ema_coeff_per_step": 0.9}',
        "namm_ema_coeff_per_step",
        "conflict",
    ),
    # keys we do not have
    _x("unknown-namm-key", '{"namm_thresold": 0.5}', "namm_thresold", "unknown"),
    _x("unknown-eviction-key", '{"kv_eviction_budgte": 256}', "kv_eviction_budgte", "unknown"),
    _x("unknown-prefix-only", '{"namm_": 1}', "namm_", "unknown"),
]


def required_key_categories(name: str) -> set[str]:
    field = RequestSettings.model_fields[name]
    need = {"type", "conflict"}
    if bounded(field):
        need.add("range")
    if "float" in str(field.annotation):
        need.add("nonfinite")
    return need


def test_every_request_key_has_bad_cases() -> None:
    assert RequestSettings.model_fields, "no per-request keys found"
    for name in RequestSettings.model_fields:
        have = {c.category for c in XARGS_CASES if c.key == name}
        missing = required_key_categories(name) - have
        assert not missing, f"vllm_xargs.{name}: no bad case of kind {sorted(missing)} in XARGS_CASES"
    ids = [c.id for c in XARGS_CASES]
    assert len(ids) == len(set(ids))


def _num_params() -> int:
    from vllm_namm.policies import DEFAULT_WEIGHTS
    from vllm_namm.weights import load_weights

    return int(load_weights(DEFAULT_WEIGHTS).params.numel())


def _xargs_text(case: XargsCase, n: int) -> str:
    return case.xargs.replace("ZEROS", "0.0, " * (n - 1))


@pytest.mark.parametrize(
    "case", [c for c in XARGS_CASES if not c.vllm_own], ids=[c.id for c in XARGS_CASES if not c.vllm_own]
)
def test_bad_xargs_rejected_without_server(case: XargsCase) -> None:
    n = _num_params()
    server = EvictionConfig(policy="namm", interval=8192)
    with pytest.raises(RequestSettingsError) as e:
        validate_for_server(parse_request_settings(json.loads(_xargs_text(case, n))), server, lambda cfg: n)
    assert case.key in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# one server: --kv-eviction namm, interval 8192 > --max-model-len 4096 (one-shot)
# ---------------------------------------------------------------------------------------------
ONE_SHOT_FLAGS = [
    "--kv-eviction",
    "namm",
    "--max-model-len",
    "4096",
    "--kv-eviction-interval",
    "8192",
    "--max-num-batched-tokens",
    "1024",
]


@pytest.fixture(scope="module")
def one_shot_server(server_pool: ServerPool, tiny_model: Path) -> VllmServer:
    return server_pool.get("one_shot", tiny_model, ONE_SHOT_FLAGS)


@pytest.mark.server
@pytest.mark.timeout(900)
def test_one_shot_single_step_at_prompt_end(one_shot_server: VllmServer) -> None:
    """A 3000-token prompt, prefilled in 1024-token chunks: one eviction step, after its last token."""
    server = one_shot_server
    prompt_len, new = 3000, 24
    for xargs in (None, {"kv_eviction": "streaming", "kv_eviction_budget": 512}):
        resp = complete(
            server,
            text(prompt_len, 90 if xargs is None else 91),
            max_tokens=new,
            ignore_eos=True,
            **({"vllm_xargs": xargs} if xargs else {}),
        )
        assert resp["usage"]["completion_tokens"] == new
        s = namm_summary(resp)
        assert s["eviction_steps"] == 1, s
        assert s["last_eviction_at"] == prompt_len, s
        if xargs:  # the budget was applied once, at prompt end: budget pages + first + last + decode
            assert s["evicted_blocks"] > 0, s
            assert s["held_blocks"] <= math.ceil(512 / 32) + 3, s
            assert s["evicted_blocks"] == s["logical_blocks"] - s["held_blocks"], s


@pytest.mark.server
@pytest.mark.timeout(900)
def test_bad_xargs_are_400_naming_the_key_and_server_stays_healthy(one_shot_server: VllmServer) -> None:
    server = one_shot_server
    n = _num_params()
    failures = []
    for case in XARGS_CASES:
        body = (
            f'{{"model": {json.dumps(server.model)}, "prompt": "abc", "max_tokens": 2, '
            f'"vllm_xargs": {_xargs_text(case, n)}}}'
        )
        r = requests.post(
            server.base_url + "/completions",
            data=body,
            headers={"Content-Type": "application/json"},
            timeout=120,
        )
        message = r.text if r.status_code != 400 else r.json().get("error", {}).get("message", r.text)
        print(f"{case.id:28s} HTTP {r.status_code}  {message[:200]}")
        one_line = case.vllm_own or "\n" not in message.strip()  # vLLM's own 400s list every union member
        if r.status_code != 400 or case.key not in message or not one_line:
            failures.append(f"{case.id}: HTTP {r.status_code}: {message[:300]}")
    assert not failures, "\n".join(failures)
    assert server.healthy()
    resp = complete(server, text(700, 92), max_tokens=8, ignore_eos=True)
    assert resp["choices"][0]["finish_reason"] == "length"
    assert namm_summary(resp)["eviction_steps"] == 1
    assert not engine_errors(server), engine_errors(server)[:20]
