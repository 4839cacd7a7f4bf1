"""Run an MLflow tracking server, and stop it together with everything it started.

    unisrec mlflow-server --root runs/mlflow              # serves http://127.0.0.1:5000
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000      # every job logs and registers there

Runs and the model registry live in a database: ``sqlite:///ROOT/mlflow.db`` unless
``backend_store_uri`` names another (``postgresql://user:pass@host/db`` for a shared,
long-lived registry). Artifacts go to ``ROOT/artifacts`` unless ``artifacts_destination``
names another place (``s3://bucket/mlflow``). Artifacts are proxied: clients upload and
download them through the server, so Ray workers need only its URL, no storage credentials.

``mlflow server`` serves through uvicorn worker processes, and stopping only the PID it
returns leaves them running. So the server runs in a session of its own, and
:func:`stop_server` ends the whole session: SIGTERM to its process group, then SIGKILL to any
process of the session still alive after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from unisrec.runtime import free_port

DEFAULT_PORT = 5000
# MLflow 3's job runner serves GenAI features this platform does not use; it adds a huey
# consumer per CPU and a temporary directory in /dev/shm that outlives the server.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class TrackingServer:
    """A running ``mlflow server``: where it answers and the process that leads its session."""

    url: str  # e.g. http://127.0.0.1:5000; the value for MLFLOW_TRACKING_URI
    process: subprocess.Popen
    log_path: Path  # the server's stdout and stderr


def server_command(
    root: Path,
    host: str,
    port: int,
    backend_store_uri: str = "",
    artifacts_destination: str = "",
) -> list[str]:
    """The ``mlflow server`` command line (run with this interpreter, so this venv's MLflow)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root.resolve() / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(root.resolve() / "artifacts"),
        # One worker is plenty for a training cluster's metric traffic, and keeps memory low.
        "--workers", "1",
    ]  # fmt: skip


def start_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_store_uri: str = "",
    artifacts_destination: str = "",
    timeout_s: float = 180.0,
) -> TrackingServer:
    """Start ``mlflow server`` and return once ``/health`` answers.

    ``port=None`` picks a free port. ``root`` holds the log (``server.log``) and, unless
    given elsewhere, the sqlite store and the artifacts. Raises RuntimeError with the end of
    the log if the server exits first, TimeoutError if it does not answer in ``timeout_s``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log_path = root / "server.log"
    command = server_command(root, host, port, backend_store_uri, artifacts_destination)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV},
            start_new_session=True,  # its own process group and session: see stop_server
        )
    # A server bound to every interface is still reached through loopback from here.
    reachable = "127.0.0.1" if host in ("0.0.0.0", "") else host
    server = TrackingServer(f"http://{reachable}:{port}", process, log_path)
    try:
        _wait_healthy(server, timeout_s)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: TrackingServer, grace_s: float = 10.0) -> None:
    """Stop the server and every process it started; safe to call twice."""
    session = server.process.pid  # start_new_session: the leader's pid is the session id
    try:
        os.killpg(session, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    try:
        server.process.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in session_processes(session):
        process.kill()  # outlived SIGTERM by the grace period
    server.process.wait()


@contextmanager
def tracking_server(
    root: str | Path, port: int | None = None, host: str = "127.0.0.1"
) -> Iterator[str]:
    """``with tracking_server(tmp_path) as url:`` a server for the block; yields its URL."""
    server = start_server(root, host=host, port=port)
    try:
        yield server.url
    finally:
        stop_server(server)


def _wait_healthy(server: TrackingServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {server.process.returncode}; "
                f"end of {server.log_path}:\n{_tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(0.25)
    raise TimeoutError(f"mlflow server at {server.url} did not answer /health in {timeout_s:.0f} s")


def session_processes(session: int) -> list:
    """The live ``psutil.Process`` es of session ``session`` (zombies excluded)."""
    import psutil

    members = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (OSError, psutil.Error):
            continue  # exited while we looked
    return members


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
