"""Start and stop ``vllm serve`` on loopback: one helper for the demo, benchmarks and tests.

It waits for ``/health``, fails fast with the log tail when the server dies during start-up,
and always stops the whole process group (API server, engine core, workers). With several
workers (``tensor_parallel_size``) it sets vLLM's CPU thread binding when vLLM's own would
refuse to start (:func:`omp_threads_bind`).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CPU_DEFAULTS: tuple[str, ...] = ("--enforce-eager", "--dtype", "float32")
"""What a tiny float32 model wants on the CPU build (no graph capture, no bf16)."""
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
_PARALLEL_FLAGS: Mapping[str, str] = MappingProxyType(
    {"--tensor-parallel-size": "tp", "-tp": "tp", "--pipeline-parallel-size": "pp", "-pp": "pp"}
)


def parallel_world_size(flags: Sequence[str]) -> int:
    """Workers (tensor x pipeline parallel size) that ``vllm serve`` flags ask for."""
    sizes = {"tp": 1, "pp": 1}
    args = list(flags)
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in _PARALLEL_FLAGS:
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else "1"
            try:
                sizes[_PARALLEL_FLAGS[name]] = int(value)
            except ValueError:
                pass  # vllm serve reports the bad value itself
    return sizes["tp"] * sizes["pp"]


def numa_nodes() -> int:
    """NUMA nodes of this machine (1 when sysfs does not say)."""
    return max(len(glob.glob("/sys/devices/system/node/node[0-9]*")), 1)


def omp_threads_bind(
    world_size: int, cpus: Sequence[int] | None = None, nodes: int | None = None
) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``world_size`` CPU workers, or None when vLLM's default works.

    Why: vLLM's CPU build binds each worker's OpenMP threads to its own NUMA node by default
    and refuses to start ("Not enough allowed NUMA nodes") with more workers than nodes, e.g.
    ``--tensor-parallel-size 2`` on a one-node machine. Then the CPUs this process may use are
    split into ``world_size`` contiguous, equal sets ("0|1" for two workers on two CPUs);
    the remainder stays free for the API server and the eviction threads. The variable is
    read by the CPU build only, so setting it is harmless on GPU.
    """
    if world_size <= 1 or (numa_nodes() if nodes is None else nodes) >= world_size:
        return None
    allowed = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(allowed) < world_size:
        raise ValueError(
            f"{world_size} CPU workers need at least {world_size} CPUs; this process may use "
            f"{len(allowed)} ({allowed})"
        )
    per = len(allowed) // world_size
    return "|".join(",".join(str(c) for c in allowed[r * per : (r + 1) * per]) for r in range(world_size))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_bin() -> str:
    """The ``vllm`` executable next to this interpreter (the venv's), else on PATH."""
    found = shutil.which("vllm", path=str(Path(sys.executable).parent)) or shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("the 'vllm' command is not installed (run scripts/install.sh)")
    return found


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{'name{labels}': value}`` (label-less series keyed by name)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([^\s{]+(?:\{.*\})?)\s+(\S+)(?:\s+\S+)?$", line)
        if m:
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
    """``vllm serve MODEL *base_flags *flags`` as a context manager (``url``: root, ``base_url``: /v1).

    ``tensor_parallel_size`` > 1 adds ``--tensor-parallel-size``; with several workers (that
    flag, or ``--tensor-parallel-size``/``--pipeline-parallel-size`` among ``flags``) the CPU
    thread binding is set unless ``env`` or the environment already sets it.
    """

    def __init__(
        self,
        model: str | Path,
        flags: Sequence[str] = (),
        *,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        base_flags: Sequence[str] = CPU_DEFAULTS,
        timeout_s: float = 300.0,
        kv_space_gib: int = 1,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.model = str(model)
        self.flags = list(flags)
        if tensor_parallel_size > 1:
            self.flags += ["--tensor-parallel-size", str(tensor_parallel_size)]
        if log_path is None:
            import tempfile

            log_path = Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
        self.log_path = Path(log_path)
        self.env = dict(os.environ) | {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib)} | dict(env or {})
        self.base_flags = list(base_flags)
        if THREADS_BIND_ENV not in self.env:
            bind = omp_threads_bind(parallel_world_size([*self.base_flags, *self.flags]))
            if bind is not None:
                self.env[THREADS_BIND_ENV] = bind
        self.timeout_s = timeout_s
        self.host = "127.0.0.1"
        self.port = free_port()
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
        return [
            vllm_bin(),
            "serve",
            self.model,
            *self.base_flags,
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self.flags,
        ]

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode} before /health:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vllm serve not healthy after {self.timeout_s:.0f}s:\n{self.log_tail()}")
            time.sleep(1.0)
        return self

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
            # The engine core and workers are children in the session we created.
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

    # ---- queries ------------------------------------------------------------------------------
    def healthy(self, timeout: float = 5.0) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    @property
    def client(self) -> Any:
        """An ``openai.OpenAI`` client for this server (no retries: tests want to see failures)."""
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.base_url, api_key="x", max_retries=0, timeout=600)
        return self._client

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def metric(self, name: str) -> float | None:
        """Sum of every series of ``name`` on ``/metrics``, or None when absent."""
        metrics = self.metrics()
        if not any(k == name or k.startswith(name + "{") for k in metrics):
            return None
        return metric_sum(metrics, name)

    def kv_usage(self) -> float:
        """``vllm:kv_cache_usage_perc`` (fraction of used KV blocks, 0..1)."""
        return metric_sum(self.metrics(), "vllm:kv_cache_usage_perc")

    def num_blocks(self) -> int:
        """KV blocks of the pool, from ``vllm:cache_config_info`` (else the start-up log)."""
        metrics = self.metrics()
        n = metric_label(metrics, "vllm:cache_config_info", "num_gpu_blocks")
        if n not in (None, "", "None"):
            return int(n)
        block_size = int(metric_label(metrics, "vllm:cache_config_info", "block_size") or 16)
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log_text())
        if m is None:
            raise RuntimeError(
                "cannot tell the number of KV blocks (no cache_config_info, no start-up log line)"
            )
        return int(m.group(1).replace(",", "")) // block_size

    def block_size(self) -> int:
        """Tokens per KV block, from ``vllm:cache_config_info``."""
        return int(metric_label(self.metrics(), "vllm:cache_config_info", "block_size") or 16)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]
