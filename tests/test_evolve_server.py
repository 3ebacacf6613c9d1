"""End-to-end acceptance of ``python -m evolve`` against a real ``vllm serve`` on a tiny random Llama.

A 2-generation run (population 4, 2 samples per task) completes and checkpoints; a
``--resume`` continues for a 3rd generation from the unchanged CMA state; the exported
weights file is then loaded by a second server (``--namm-weights``), which must come up
healthy. Slow (two server start-ups): marked ``server``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from servers import ServerPool, VllmServer

from benchmarks.launch import CPU_DEFAULTS

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def vllm_server(model: Path, *args: str, log: Path) -> Iterator[str]:
    """``vllm serve`` on the tiny model (the shared launcher); yields the OpenAI base URL."""
    with VllmServer(
        model, ["--max-model-len", "4096", *args], log_path=log, base_flags=CPU_DEFAULTS
    ) as server:
        yield server.base_url


def _evolve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evolve", "--no-progress", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )


def test_evolve_end_to_end_resume_and_export(tmp_path: Path, server_pool: ServerPool):
    server_pool.close()  # this test starts servers of its own: one live server at a time
    from benchmarks.tiny_model import build_random_llama
    from evolve.loop import CHECKPOINT, RunState
    from vllm_namm.weights import NammWeights, load_weights, save_weights

    model = build_random_llama(tmp_path / "tiny")
    start = tmp_path / "start.safetensors"
    save_weights(start, NammWeights.zeros())  # the paper's start: all-zero BAM, evicts nothing
    out = tmp_path / "run"
    cfg = str(ROOT / "evolve" / "configs" / "ci_smoke.json")

    with vllm_server(
        model, "--kv-eviction", "namm", "--namm-weights", str(start), log=tmp_path / "server1.log"
    ) as url:
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
    with vllm_server(
        model, "--kv-eviction", "namm", "--namm-weights", str(best), log=tmp_path / "server2.log"
    ):
        pass  # healthy = loaded
