"""Shared fixtures and helpers for tests that run a real ``vllm serve`` on a tiny local model.

* ``tiny_model``: a 2-layer random Llama (head_dim 32) + character tokenizer, built once per session.
* :func:`free_port`, :class:`VllmServer` (context manager: start, wait for ``/health``, always stop),
  :func:`run_vllm_fail` (``vllm serve`` with flags that must make it exit, with a timeout).
* ``server_pool``: session-scoped; keeps at most ONE server alive at a time (the machines running
  the suite have few cores), restarting only when a test asks for another configuration. Order the
  tests of a module by configuration to start each server once.

Heavy tests are marked ``@pytest.mark.server`` (deselect with ``-m "not server"``).
"""

from __future__ import annotations

import triton_interpreter  # noqa: F401 - first: the Triton interpreter switch must precede any kernel import

# isort: split

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_namm.launch import ROOT, free_port, metric_label, metric_sum, parse_metrics, vllm_bin
from vllm_namm.launch import VllmServer as _LaunchServer

__all__ = ["free_port", "metric_label", "metric_sum", "parse_metrics"]
BLOCK_SIZE = 32
# Flags every tiny test server gets (CPU backend: block size must be a multiple of 32).
BASE_FLAGS: tuple[str, ...] = (
    "--enforce-eager",
    "--dtype",
    "float32",
    "--max-model-len",
    "8192",
    "--block-size",
    str(BLOCK_SIZE),
)
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


class VllmServer(_LaunchServer):
    """:class:`vllm_namm.launch.VllmServer` with the tiny-model flags and environment of the tests."""

    def __init__(
        self,
        model: str | Path,
        flags: Sequence[str] = (),
        *,
        log_path: str | Path,
        env: Mapping[str, str] | None = None,
        base_flags: Sequence[str] = BASE_FLAGS,
        timeout_s: float = 300.0,
    ) -> None:
        super().__init__(
            model,
            flags,
            log_path=log_path,
            env=DEFAULT_ENV | dict(env or {}),
            base_flags=base_flags,
            timeout_s=timeout_s,
        )

    def model_name(self) -> str:
        return self.model


@dataclass
class FailedRun:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_vllm_fail(
    model: str | Path,
    flags: Sequence[str],
    *,
    timeout_s: float = 240.0,
    env: Mapping[str, str] | None = None,
    base_flags: Sequence[str] = BASE_FLAGS,
) -> FailedRun:
    """Run ``vllm serve MODEL *flags`` expecting it to exit by itself; kill it at ``timeout_s``.

    ``returncode`` is None when it had to be killed (it did not exit by itself).
    """
    return run_vllm(
        ["serve", str(model), *base_flags, "--host", "127.0.0.1", "--port", str(free_port()), *flags],
        timeout_s=timeout_s,
        env=env,
    )


def run_vllm(
    args: Sequence[str], *, timeout_s: float = 240.0, env: Mapping[str, str] | None = None
) -> FailedRun:
    """Run ``vllm *args`` with a timeout (killed at ``timeout_s``: returncode None); capture its output."""
    cmd = [vllm_bin(), *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ) | DEFAULT_ENV | dict(env or {}),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        rc = None
    return FailedRun(rc, out.decode(errors="replace"), err.decode(errors="replace"), time.monotonic() - t0)


class ServerPool:
    """At most one live server; ``get(key, ...)`` reuses it if ``key`` matches, else restarts."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.key: str | None = None
        self.server: VllmServer | None = None
        self.starts: dict[str, int] = {}

    def get(
        self,
        key: str,
        model: str | Path,
        flags: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        base_flags: Sequence[str] = BASE_FLAGS,
    ) -> VllmServer:
        if self.server is not None and self.key == key and self.server.alive:
            return self.server
        self.close()
        n = self.starts[key] = self.starts.get(key, 0) + 1
        server = VllmServer(
            model, flags, env=env, log_path=self.log_dir / f"{key}-{n}.log", base_flags=base_flags
        )
        server.start()
        self.key, self.server = key, server
        return server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vllm_namm.tiny_model import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("tiny_model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("vllm_logs"))
    try:
        yield pool
    finally:
        pool.close()
