"""Start and stop a ``vllm serve`` process on loopback (demo, benchmarks, evolve tests).

One small helper rather than one per tool: it waits for ``/health``, fails fast with the
log tail when the server dies during start-up, and always cleans up.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The ``vllm`` executable next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("vllm")
    if here.exists():
        return [str(here)]
    found = shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("the 'vllm' command is not installed (run scripts/install.sh)")
    return [found]


CPU_DEFAULTS = ["--enforce-eager", "--dtype", "float32"]


class VllmServer:
    """``with VllmServer(model, ["--kv-eviction", "namm"]) as srv: srv.base_url ...``"""

    def __init__(
        self,
        model: str | Path,
        args: list[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        kv_space_gib: float = 1,
        log_path: str | Path | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        self.model = str(model)
        self.args = list(args or [])
        self.port = free_port()
        self.env = dict(os.environ) | {"VLLM_CPU_KVCACHE_SPACE": str(kv_space_gib)} | (env or {})
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="vllm-serve-")) / "server.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        cmd = [*vllm_command(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float | None:
        """Sum of every sample of ``name`` (labels ignored) on ``/metrics``, or None."""
        total, seen = 0.0, False
        pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$")
        for line in self.metrics_text().splitlines():
            m = pattern.match(line)
            if m:
                total += float(m.group(1))
                seen = True
        return total if seen else None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def num_kv_blocks(self) -> int | None:
        """Total KV blocks of the server, from its start-up log (``KV cache size: N tokens``)."""
        m = re.search(r"KV cache size: ([\d,]+) tokens", self.log_text())
        bs = 16
        if "--block-size" in self.args:
            bs = int(self.args[self.args.index("--block-size") + 1])
        return int(m.group(1).replace(",", "")) // bs if m else None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
