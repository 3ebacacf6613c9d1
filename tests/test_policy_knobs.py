"""A policy owns its knobs (issue 30, item 3): one file plus one registration line give it a flag, a
per-request key and their validation.

Shown literally: the package is copied, ``policies/probe.py`` below is added to the copy and one line
to its registry, and a fresh interpreter running the copy finds ``--kv-eviction probe``, the knob's
flag ``--probe-window`` and key ``probe_window``, its bounds checked with the usual messages, and the
rules that keep it to its own policy. Nothing else of the copy differs from the package, which the
test checks too.
"""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import vllm_namm

CORE = Path(vllm_namm.__file__).resolve().parent

PROBE = '''\
"""probe: keep the tokens of the newest queries' window (a test policy with one knob of its own)."""

from typing import Annotated

from pydantic import Field
from torch import Tensor

from vllm_namm.policies.base import LayerView, PolicyState
from vllm_namm.policies.budget import BudgetPolicy
from vllm_namm.settings import Knob, PolicySettings


class ProbeSettings(PolicySettings):
    probe_window: Annotated[int, Knob(flag="--probe-window", key="probe_window")] = Field(
        16, gt=0, le=4096, description="recent tokens ranked first"
    )


class ProbePolicy(BudgetPolicy):
    name = "probe"
    Settings = ProbeSettings
    needs_attention = False

    @classmethod
    def from_config(cls, config, weights):
        policy = super().from_config(config, weights)
        policy.window = config.probe_window
        return policy

    def score(self, view: LayerView, state: PolicyState) -> Tensor:
        return (view.positions > view.positions.max() - self.window).float()
'''
REGISTRATION = '        "probe": "vllm_namm.policies.probe:ProbePolicy",\n'

CHECKS = textwrap.dedent(
    """
    import argparse, json, sys
    from vllm_namm.config import BudgetConfig, EvictionConfig
    from vllm_namm.policies import make_policy
    from vllm_namm.vllm_patch.cli import FLAGS, add_flags, config_from_args
    from vllm_namm.vllm_patch.engine_config import NammConfigError
    from vllm_namm.vllm_patch.request_settings import (
        RequestSettingsError, parse_request_settings, validate_for_server,
    )

    out = {}
    parser = argparse.ArgumentParser()
    add_flags(parser)
    out["choices"] = FLAGS["--kv-eviction"][1]["choices"]
    out["flag"] = [FLAGS["--probe-window"][0], FLAGS["--probe-window"][1]["type"].__name__]

    def flags(*argv):
        try:
            return config_from_args(parser.parse_args(list(argv)))
        except NammConfigError as e:
            return str(e)

    probe = ["--kv-eviction", "probe", "--kv-eviction-budget", "64"]
    cfg = flags(*probe, "--probe-window", "8")
    out["from_flags"] = [cfg["policy"], cfg["probe_window"], make_policy(EvictionConfig(**cfg)).window]
    out["flag_errors"] = [
        flags(*probe, "--probe-window", "0"),
        flags(*probe, "--probe-window", "5000"),
        flags("--kv-eviction", "h2o", "--kv-eviction-budget", "64", "--probe-window", "8"),
        flags("--probe-window", "8"),
    ]

    def request(xargs, server):
        try:
            settings = parse_request_settings(xargs)
            validate_for_server(settings, server, lambda cfg: 0)
            return make_policy(settings.apply(server)).window
        except RequestSettingsError as e:
            return str(e)

    h2o = EvictionConfig(policy="h2o", budget=BudgetConfig(tokens=64))
    probe_server = EvictionConfig(policy="probe", budget=BudgetConfig(tokens=64), probe_window=8)
    out["requests"] = [
        request({"kv_eviction": "probe", "probe_window": 4}, h2o),
        request({"probe_window": 32}, probe_server),
        request({}, probe_server),
        request({"kv_eviction": "probe", "probe_window": 0}, h2o),
        request({"kv_eviction": "probe", "probe_windw": 4}, h2o),
        request({"probe_window": 4}, h2o),
    ]
    try:
        EvictionConfig(policy="h2o", budget=BudgetConfig(tokens=64), probe_window=3)
    except ValueError as e:
        out["config_error"] = e.errors()[0]["msg"]
    json.dump(out, sys.stdout)
    """
)


def _copy_with_probe(root: Path) -> Path:
    """The package, copied under ``root``, with the probe policy: one file and one registration line."""
    copy = root / "vllm_namm"
    shutil.copytree(CORE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    (copy / "policies" / "probe.py").write_text(PROBE)
    registry = copy / "policies" / "registry.py"
    text = registry.read_text()
    anchor = '        "snapkv": "vllm_namm.policies.snapkv:SnapKVPolicy",\n'
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + REGISTRATION))
    return copy


def _changes(original: Path, copy: Path) -> tuple[list[str], list[str]]:
    """Files only in the copy, and the lines that differ between the two trees."""

    def files(tree: Path) -> set[str]:
        return {str(p.relative_to(tree)) for p in tree.rglob("*.py") if "__pycache__" not in p.parts}

    added = sorted(files(copy) - files(original))
    lines = []
    for name in sorted(files(original)):
        a, b = (original / name).read_text().splitlines(), (copy / name).read_text().splitlines()
        lines += [
            d
            for d in difflib.unified_diff(a, b, lineterm="", n=0)
            if d[:1] in "+-" and d[:3] not in ("+++", "---")
        ]
    return added, lines


def test_a_policy_with_one_knob_is_one_file_and_one_line(tmp_path: Path) -> None:
    copy = _copy_with_probe(tmp_path)
    added, lines = _changes(CORE, copy)
    assert added == ["policies/probe.py"]
    assert lines == ["+" + REGISTRATION.rstrip("\n")]
    proc = subprocess.run(
        [sys.executable, "-c", CHECKS], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert "probe" in out["choices"]
    assert out["flag"] == ["probe_window", "int"]  # a flag, typed from the declaration
    assert out["from_flags"] == ["probe", 8, 8]  # flag -> config -> the policy built from it
    assert out["flag_errors"] == [
        "--probe-window 0: must be greater than 0",
        "--probe-window 5000: must be less than or equal to 4096",
        "--probe-window only applies to --kv-eviction probe, not h2o",
        "--probe-window has no effect without --kv-eviction POLICY (the default, none, leaves vLLM unchanged)",
    ]
    assert out["requests"] == [
        4,  # a per-request key, on a server running another policy
        32,  # overriding its server's value
        8,  # the server's value
        "vllm_xargs.probe_window: must be greater than 0",
        "vllm_xargs.probe_windw: Extra inputs are not permitted",  # the policy's prefix is ours now
        "vllm_xargs.probe_window: only valid with kv_eviction=probe, this request runs h2o",
    ]
    assert out["config_error"] == "Value error, probe_window only applies to policy 'probe', not 'h2o'"


def test_the_copy_runs_the_package_not_the_installed_one(tmp_path: Path) -> None:
    """The check above imports the copy (the interpreter's first path entry is its working directory)."""
    copy = _copy_with_probe(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "import vllm_namm; print(vllm_namm.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(proc.stdout.strip()).parent == copy
