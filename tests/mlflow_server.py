"""A real ``mlflow server`` for tests: SQLite backend, proxied artifacts in a temp dir, 127.0.0.1 only.

``MlflowServer(root).start()`` runs ``python -m mlflow server`` (the venv's own MLflow) as a
subprocess in its own process group on a free port, waits until ``GET /health`` answers, and
``stop()`` ends that process group (the server's workers included). ``kill()`` drops it abruptly
(SIGKILL) to simulate a crash; ``start()`` again brings it back on the same port and store.
The ``mlflow_server`` fixture always stops it, whatever the test did.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None, workers: int = 1) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.workers = workers
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_uri,
                "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return requests.get(f"{self.uri}/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            return False

    def start(self, timeout: float = 180.0) -> "MlflowServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"mlflow server already running on {self.uri}")
        if self.healthy(timeout=0.5):
            raise RuntimeError(f"port {self.port} already serves something: cannot start mlflow server there")
        env = os.environ.copy()
        env.pop("MLFLOW_TRACKING_URI", None)
        # tracking only: no GenAI job runner (it forks half a dozen huey consumers, ~30 s of start-up on 2 cores)
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed in _reap
        self.proc = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"mlflow server exited with status {self.proc.returncode} before answering "
                                   f"/health:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not answer /health within {timeout:.0f}s:\n"
                           f"{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # the server's own process group (start_new_session)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # workers that outlived their parent
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._reap()
        self._wait_port_closed()

    def kill(self) -> None:
        """Drop the server abruptly, like a crash: SIGKILL the whole process group."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(10)
        self._reap()
        self._wait_port_closed()

    def _wait_port_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A started real MLflow server with its store under ``tmp_path/mlflow-server``; always stopped."""
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        yield server.start()
    finally:
        server.stop()
