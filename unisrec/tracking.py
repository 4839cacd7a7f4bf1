"""MLflow conventions shared by every job: where the store is, what a run records."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from unisrec.config import flatten, to_dict

# MLflow's file store (./mlruns) refuses to start in MLflow 3: the embedded default is sqlite.
DEFAULT_STORE = "mlflow.db"


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


def configure_mlflow(uri: str = "") -> str:
    """Point this process's MLflow client at the store; returns the resolved URI."""
    import mlflow

    resolved = resolve_tracking_uri(uri)
    mlflow.set_tracking_uri(resolved)
    mlflow.set_registry_uri(resolved)
    return resolved


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
