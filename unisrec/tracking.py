"""MLflow conventions shared by every job: where the store is, what a run records."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from unisrec.config import flatten, to_dict
from unisrec.errors import ConfigError

# MLflow's file store (./mlruns) refuses to start in MLflow 3: the embedded default is sqlite.
DEFAULT_STORE = "mlflow.db"
PROBE_TIMEOUT_S = 5.0  # MLflow's own client retries for minutes before it gives up


class TrackingServerError(ConfigError):
    """The tracking URI names a server that does not answer (down, or the wrong URI)."""


def resolve_tracking_uri(uri: str = "") -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    A relative sqlite path is made absolute, so Ray workers (which run in another directory)
    write to the same store as the driver.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return f"sqlite:///{Path.cwd() / DEFAULT_STORE}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if "://" not in uri:  # a bare path: a sqlite file
        return f"sqlite:///{Path(uri).resolve()}"
    return uri


def configure_mlflow(uri: str = "", create: bool = True) -> str:
    """Point this process's MLflow client at the store; returns the resolved URI.

    A tracking server is probed once first, so a server that is down fails in seconds with
    :class:`TrackingServerError` instead of after MLflow's minutes of retries. A sqlite
    store that does not exist is created, unless ``create`` is False (a command that only
    reads: nothing is there to read).
    """
    import mlflow

    resolved = resolve_tracking_uri(uri)
    probe_tracking_server(resolved)
    path = sqlite_path(resolved)
    if create or path is None or path.exists():
        init_sqlite_store(resolved)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory ones)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def artifact_root(uri: str) -> str | None:
    """Where experiments on a local sqlite store keep their artifacts: ``mlartifacts/`` beside
    the database, so a store's directory holds its runs and their files together. None for a
    tracking server (the server decides)."""
    path = sqlite_path(uri)
    return str(path.parent / "mlartifacts") if path else None


def init_sqlite_store(uri: str) -> None:
    """Create or migrate a local sqlite store under an exclusive lock (``<db>.lock``).

    MLflow creates the tables on first use without a lock: two processes doing so at once
    race in its migration and leave the store unusable. Here the first one creates it and the
    others wait, then find it ready. The store's default experiment keeps its artifacts in
    :func:`artifact_root` too.
    """
    import fcntl

    path = sqlite_path(uri)
    if path is None:
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        TrackingStore(uri, artifact_root(uri))
        RegistryStore(uri)


def set_experiment(name: str, uri: str = "") -> str:
    """``mlflow.set_experiment(name)``; on a local store a new experiment is created with its
    artifacts under :func:`artifact_root` rather than in ``$PWD/mlruns``. Returns its id."""
    import re

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(uri or mlflow.get_tracking_uri())
    root = artifact_root(uri)
    client = MlflowClient(uri)
    if root and client.get_experiment_by_name(name) is None:
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        try:
            client.create_experiment(name, artifact_location=str(Path(root) / folder))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # else another process was first
                raise
    return mlflow.set_experiment(name).experiment_id


def probe_tracking_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise TrackingServerError unless the http(s) server at ``uri`` answers within
    ``timeout_s``; any HTTP answer counts (an auth error still means it is up). Other URIs
    (sqlite, databricks, ...) are not probed."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingServerError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or point "
            "mlflow.tracking_uri / $MLFLOW_TRACKING_URI at one that runs"
        ) from None


def config_params(cfg: Any) -> dict[str, str]:
    """The whole config as MLflow params (dotted keys, values as strings)."""
    return {
        k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        for k, v in flatten(to_dict(cfg)).items()
    }


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def pinned_requirements(packages: tuple[str, ...]) -> list[str]:
    """``name==version`` of each installed distribution in ``packages`` (a local version
    label such as ``+cpu`` dropped, so the pin names a release an index has)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in packages]


def git_commit() -> str:
    """The commit of the code that runs (``unknown`` outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def logged_model_id(version) -> str | None:
    """The logged model behind a registered ``ModelVersion`` (MLflow 3 registers
    ``models:/<model id>`` as its source), or None for a version registered otherwise."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/") :] if source.startswith("models:/m-") else None
