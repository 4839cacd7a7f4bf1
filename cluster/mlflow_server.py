"""Run an MLflow tracking server, and stop it together with everything it started.

    unisrec mlflow-server --root runs/mlflow              # serves http://127.0.0.1:5000
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000      # every job logs and registers there

Runs and the model registry live in a database: ``sqlite:///ROOT/mlflow.db`` unless
``backend_store_uri`` names another (``postgresql://user:pass@host/db`` for a shared,
long-lived registry). Artifacts go to ``ROOT/artifacts`` unless ``artifacts_destination``
names another place (``s3://bucket/mlflow``). Artifacts are proxied: clients upload and
download them through the server, so Ray workers need only its URL, no storage credentials.

With ``auth`` (``unisrec mlflow-server --auth``) it runs MLflow's basic-auth app: every call
needs a user, and users hold per-experiment and per-registered-model permissions (READ, EDIT,
MANAGE) granted by the admin (``unisrec tenants ...``, ``cluster/accounts.py``). Nothing is
granted by default (``default_permission = NO_PERMISSIONS``). The admin's password comes from
``$UNISREC_ADMIN_PASSWORD``: the admin user is created with it, or set to it, in the user
store before the server starts, so the password never goes into a file or to the server
process. The auth config (``ROOT/auth/basic_auth.ini``) and the Flask secret key
(``ROOT/auth/secret_key``, unless ``$MLFLOW_FLASK_SERVER_SECRET_KEY`` is set) are private to
the user that runs the server, and so is all of ROOT: it holds every tenant's runs and
weights (the sqlite store, the artifacts), which the permissions guard only over HTTP. ROOT
is made 0700, what it holds 0700 (folders) and 0600 (files), and the server runs with umask
077, so what it writes later is private too.

``mlflow server`` serves through uvicorn worker processes, and stopping only the PID it
returns leaves them running. So the server runs in a session of its own, and
:func:`stop_server` ends the whole session: SIGTERM to its process group, then SIGKILL to any
process of the session still alive after a grace period.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from unisrec.errors import ConfigError
from unisrec.runtime import free_port

DEFAULT_PORT = 5000
# MLflow 3's job runner serves GenAI features this platform does not use; it adds a huey
# consumer per CPU and a temporary directory in /dev/shm that outlives the server.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

ADMIN_PASSWORD_ENV = "UNISREC_ADMIN_PASSWORD"
PRIVATE_UMASK = 0o077  # with --auth: what the server writes is its user's alone
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # what MLflow's auth app reads (CSRF)
MIN_PASSWORD_CHARS = 12  # MLflow's own rule for user passwords
# The admin password older MLflow versions shipped in basic_auth.ini; never accepted.
LEGACY_DEFAULT_PASSWORD = "password1234"
# Settings the auth app would take from the environment over the config file; the server
# process gets none of them, so the private config file is the whole truth.
AUTH_ENV_OVERRIDES = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")


@dataclass
class AuthSettings:
    """Users and permissions for the server (MLflow's basic-auth app)."""

    admin_password: str = field(repr=False)
    admin_username: str = "admin"
    database_uri: str = ""  # the user store; "" = sqlite:///ROOT/auth/basic_auth.db

    @classmethod
    def from_env(cls, admin_username: str = "admin", database_uri: str = "") -> AuthSettings:
        """The admin password from ``$UNISREC_ADMIN_PASSWORD``; ConfigError when it is unset,
        shorter than MLflow allows, or the insecure default older MLflow versions shipped."""
        password = os.environ.get(ADMIN_PASSWORD_ENV, "")
        if not password:
            raise ConfigError(
                f"--auth: set {ADMIN_PASSWORD_ENV} to the admin user's password; the server "
                "does not start without it"
            )
        check_password(password, ADMIN_PASSWORD_ENV)
        return cls(
            admin_password=password, admin_username=admin_username, database_uri=database_uri
        )


def check_password(password: str, what: str) -> str:
    """``password`` if MLflow will take it (>= 12 characters, not the legacy default)."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ConfigError(f"{what}: a password needs at least {MIN_PASSWORD_CHARS} characters")
    if password == LEGACY_DEFAULT_PASSWORD:
        raise ConfigError(f"{what}: refusing MLflow's old built-in default password")
    return password


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
    auth: bool = False,
) -> list[str]:
    """The ``mlflow server`` command line (run with this interpreter, so this venv's MLflow);
    ``auth`` runs MLflow's basic-auth app (configured by ``$MLFLOW_AUTH_CONFIG_PATH``)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root.resolve() / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(root.resolve() / "artifacts"),
        # One worker is plenty for a training cluster's metric traffic, and keeps memory low.
        "--workers", "1",
        *(["--app-name", "basic-auth"] if auth else []),
    ]  # fmt: skip


def write_auth_config(root: Path, auth: AuthSettings) -> Path:
    """``ROOT/auth/basic_auth.ini`` (directory 0700, file 0600): nothing granted by default,
    the user store, the admin's name. No password: :func:`ensure_admin` sets it in the store."""
    folder = root.resolve() / "auth"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    database_uri = auth.database_uri or f"sqlite:///{folder / 'basic_auth.db'}"
    path = folder / "basic_auth.ini"
    text = (
        "# Written by `unisrec mlflow-server --auth`; rewritten at every start.\n"
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {auth.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # Checking a password costs a PBKDF2 hash (~1 s per call on a busy 2-core machine).
        # Cached per worker for a minute; the server runs one worker, which drops a user's
        # entry when its password changes through the API.
        "auth_cache_ttl_seconds = 60\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    path.chmod(0o600)
    return path


def make_private(root: Path) -> None:
    """``root`` 0700 and everything under it only its owner's: folders 0700, files 0600
    (links are left alone: they may point outside)."""
    root.chmod(0o700)
    for folder, folders, files in os.walk(root):
        for name in folders:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(0o700)
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                path.chmod(0o600)


def secret_key(root: Path) -> str:
    """``$MLFLOW_FLASK_SERVER_SECRET_KEY``, else one kept in ``ROOT/auth/secret_key`` (made
    once, 0600), so a restarted server keeps the key its forms were signed with."""
    if os.environ.get(SECRET_KEY_ENV):
        return os.environ[SECRET_KEY_ENV]
    path = root.resolve() / "auth" / "secret_key"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text(encoding="utf-8").strip()


def ensure_admin(config_path: Path, auth: AuthSettings) -> str:
    """Create the admin user with ``auth.admin_password``, or set an existing one's password
    (and admin flag) to it; returns ``created`` or ``updated``.

    MLflow itself only creates the admin when the store has none and ignores the configured
    password afterwards; here the environment's password is always the admin's.
    """
    import configparser
    import warnings

    with warnings.catch_warnings():  # importing MLflow's server warns about Starlette's WSGI
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    config = configparser.ConfigParser()
    config.read(config_path)
    store = SqlAlchemyStore()
    store.init_db(config["mlflow"]["database_uri"])
    name = auth.admin_username
    if not store.has_user(name, use_primary=True):
        store.create_user(name, auth.admin_password, is_admin=True)
        return "created"
    store.update_user(name, password=auth.admin_password, is_admin=True)
    return "updated"


def start_server(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend_store_uri: str = "",
    artifacts_destination: str = "",
    timeout_s: float = 180.0,
    auth: AuthSettings | None = None,
) -> TrackingServer:
    """Start ``mlflow server`` and return once ``/health`` answers.

    ``port=None`` picks a free port. ``root`` holds the log (``server.log``) and, unless
    given elsewhere, the sqlite store and the artifacts. With ``auth``, the server runs
    MLflow's basic-auth app and ``root`` is private to this user (see the module's docstring). Raises RuntimeError with the end of
    the log if the server exits first, TimeoutError if it does not answer in ``timeout_s``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log_path = root / "server.log"
    command = server_command(
        root, host, port, backend_store_uri, artifacts_destination, auth=auth is not None
    )
    env = {**os.environ, **SERVER_ENV}
    umask = -1  # Popen's "leave it as it is"
    if auth is not None:
        config_path = write_auth_config(root, auth)
        ensure_admin(config_path, auth)
        for key in AUTH_ENV_OVERRIDES:
            env.pop(key, None)
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(config_path), **{SECRET_KEY_ENV: secret_key(root)})
        make_private(root)  # the store, the artifacts, the user store, the log
        umask = PRIVATE_UMASK
    log_mode = 0o600 if auth is not None else 0o666
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, log_mode)
    with os.fdopen(log_fd, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group and session: see stop_server
            umask=umask,
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
    root: str | Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    auth: AuthSettings | None = None,
) -> Iterator[str]:
    """``with tracking_server(tmp_path) as url:`` a server for the block; yields its URL."""
    server = start_server(root, host=host, port=port, auth=auth)
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
