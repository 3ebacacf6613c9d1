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

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_BIN = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm") or "vllm"
BLOCK_SIZE = 32
# Flags every tiny test server gets (CPU backend: block size must be a multiple of 32).
BASE_FLAGS: tuple[str, ...] = (
    "--enforce-eager", "--dtype", "float32", "--max-model-len", "8192", "--block-size", str(BLOCK_SIZE),
)
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> ``{'name{labels}': value}`` (label-less series keyed by name)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^\s{]+(?:\{.*\})?)\s+(\S+)(?:\s+\S+)?$", line)
        if not m:
            continue
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            continue
    return out


def metric_sum(metrics: Mapping[str, float], name: str) -> float:
    """Sum of every series of ``name`` (over its labels); 0.0 when absent."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def metric_label(metrics: Mapping[str, float], name: str, label: str) -> str | None:
    """The value of ``label`` on the first series of ``name`` (e.g. num_gpu_blocks of cache_config_info)."""
    for k in metrics:
        if k.startswith(name + "{"):
            m = re.search(label + r'="([^"]*)"', k)
            if m:
                return m.group(1)
    return None


class VllmServer:
    """``vllm serve MODEL *flags`` as a context manager.

    Waits for ``/health`` (up to ``timeout_s``), failing fast with the log tail if the process
    exits; on exit terminates the process group (the API server and its engine-core child),
    then kills it if it lingers. stdout+stderr go to ``log_path``.
    """

    def __init__(self, model: str | Path, flags: Sequence[str] = (), *, log_path: str | Path,
                 env: Mapping[str, str] | None = None, base_flags: Sequence[str] = BASE_FLAGS,
                 timeout_s: float = 300.0) -> None:
        self.model = str(model)
        self.flags = list(flags)
        self.log_path = Path(log_path)
        self.env = dict(os.environ) | DEFAULT_ENV | dict(env or {})
        self.base_flags = list(base_flags)
        self.timeout_s = timeout_s
        self.port = free_port()
        self.host = "127.0.0.1"
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def command(self) -> list[str]:
        return [VLLM_BIN, "serve", self.model, *self.base_flags, "--host", self.host, "--port", str(self.port),
                *self.flags]

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        log.write(("$ " + " ".join(self.command) + "\n").encode())
        log.flush()
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self.healthy():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} before /health:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vllm serve not healthy after {self.timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(1.0)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
        finally:
            # The engine core is a child in the session we created: make sure it is gone too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> VllmServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- queries -------------------------------------------------------------------------
    def healthy(self, timeout: float = 5.0) -> bool:
        import requests

        try:
            return requests.get(self.url + "/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    @property
    def client(self) -> Any:
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=600)
        return self._client

    def metrics_text(self) -> str:
        import requests

        r = requests.get(self.url + "/metrics", timeout=30)
        r.raise_for_status()
        return r.text

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def kv_usage(self) -> float:
        """``vllm:kv_cache_usage_perc`` (fraction of used KV blocks, 0..1)."""
        return metric_sum(self.metrics(), "vllm:kv_cache_usage_perc")

    def num_blocks(self) -> int:
        """KV blocks of the pool, from ``vllm:cache_config_info`` (else the startup log)."""
        n = metric_label(self.metrics(), "vllm:cache_config_info", "num_gpu_blocks")
        if n not in (None, "", "None"):
            return int(n)
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log_text())
        assert m, "no KV cache size in the server log"
        return int(m.group(1).replace(",", "")) // BLOCK_SIZE

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

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


def run_vllm_fail(model: str | Path, flags: Sequence[str], *, timeout_s: float = 240.0,
                  env: Mapping[str, str] | None = None, base_flags: Sequence[str] = BASE_FLAGS) -> FailedRun:
    """Run ``vllm serve MODEL *flags`` expecting it to exit by itself; kill it at ``timeout_s``.

    ``returncode`` is None when it had to be killed (it did not exit by itself).
    """
    return run_vllm(["serve", str(model), *base_flags, "--host", "127.0.0.1", "--port", str(free_port()), *flags],
                    timeout_s=timeout_s, env=env)


def run_vllm(args: Sequence[str], *, timeout_s: float = 240.0, env: Mapping[str, str] | None = None) -> FailedRun:
    """Run ``vllm *args`` with a timeout (killed at ``timeout_s``: returncode None); capture its output."""
    cmd = [VLLM_BIN, *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ) | DEFAULT_ENV | dict(env or {}), cwd=ROOT,
                            start_new_session=True)
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

    def get(self, key: str, model: str | Path, flags: Sequence[str] = (), *,
            env: Mapping[str, str] | None = None) -> VllmServer:
        if self.server is not None and self.key == key and self.server.alive:
            return self.server
        self.close()
        n = self.starts[key] = self.starts.get(key, 0) + 1
        server = VllmServer(model, flags, env=env, log_path=self.log_dir / f"{key}-{n}.log")
        server.start()
        self.key, self.server = key, server
        return server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from benchmarks.tiny_model import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("tiny_model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def server_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(tmp_path_factory.mktemp("vllm_logs"))
    try:
        yield pool
    finally:
        pool.close()
