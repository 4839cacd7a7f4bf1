"""Submit platform jobs (shard, pretrain, finetune, recommend-batch) to a running Ray cluster
via Ray Jobs.

    unisrec submit --address http://127.0.0.1:8265 \\
        --tracking-uri http://10.0.1.5:5000 \\
        pretrain benchmarks/configs/pretrain-shared.yaml data.dir=/mnt/shared/data --num-workers 4

does the same as Ray's own command line::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://10.0.1.5:5000"}}' \\
        -- python -m recipes.cli pretrain benchmarks/configs/pretrain-shared.yaml \\
           data.dir=/mnt/shared/data --num-workers 4

The address is the head node's dashboard. For a cluster made from ``ray_cluster.yaml``,
``ray dashboard ray_cluster.yaml`` forwards it to http://127.0.0.1:8265 on your machine.

What travels with the job, and what does not:

* The working directory (default: the current one) is zipped and uploaded; the job runs in a
  fresh copy of it on the head node. Ray leaves out ``.git``, ``.venv`` and whatever
  ``.gitignore`` lists; :data:`EXCLUDES` adds local run outputs. The entrypoint is
  ``python -m recipes.cli``, and Ray puts the copy first on ``PYTHONPATH``, so the job runs
  the code you submitted, whatever version of the package the nodes have installed.
* CONFIG must lie inside the working directory: the job reads it there, by relative path.
* Paths *inside* the config are read on the cluster. Point ``data.dir``, ``output_dir`` and
  ``distributed.storage_path`` at shared storage (``/mnt/shared/...``), not at your disk.
  So are ``recommend-batch``'s ``--users``, ``--data-dir`` and ``--out``: its actors read the
  users on the workers and the driver writes the output on the head node.
* ``MLFLOW_TRACKING_URI`` is set on every node by ``ray_cluster.yaml``; ``--tracking-uri``
  overrides it for one job.
* The submitting user's tracking credentials (``MLFLOW_TRACKING_USERNAME`` /
  ``MLFLOW_TRACKING_PASSWORD``, or MLflow's credentials file) travel as a private package
  uploaded with the job (``py_modules``: a credentials file, 0600), not as its environment,
  which Ray shows in its dashboard, ``ray job list`` and the state API. The job's driver and
  every Ray worker it starts read it at start (``unisrec.access.load_credentials_package``,
  the job's ``worker_process_setup_hook``), so on a server started with ``--auth`` the job
  has that user's permissions and no more. The package lies in Ray's storage (GCS) and, once
  unpacked, in its session directory on the nodes that run the job's processes.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from unisrec.errors import ConfigError

CONFIG_JOBS = ("shard", "pretrain", "finetune")  # each reads a YAML config
SUBMITTABLE_JOBS = (*CONFIG_JOBS, "recommend-batch")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # what `ray job submit` uses without --address
# Local outputs that must not be uploaded (gitignore-style patterns, relative to working_dir).
EXCLUDES = [
    "runs/",
    "outputs/",
    "mlruns/",
    "mlartifacts/",
    "mlflow.db",
    "__pycache__/",
    ".venv/",
    ".git/",
]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobSpec:
    """What :func:`submit` hands to Ray Jobs."""

    entrypoint: str  # a shell command line, run in the uploaded working directory
    runtime_env: dict
    metadata: dict[str, str] = field(default_factory=dict)  # shown by `ray job list`


def entrypoint(job: str, config: str | None, args: list[str] | tuple[str, ...] = ()) -> str:
    """``python -m recipes.cli JOB [CONFIG] ARGS...`` as one shell-quoted command line."""
    if job not in SUBMITTABLE_JOBS:
        raise ValueError(f"job: must be one of {', '.join(SUBMITTABLE_JOBS)}, got {job!r}")
    return shlex.join(["python", "-m", "recipes.cli", job, *([config] if config else []), *args])


def runtime_env(
    working_dir: str | Path,
    tracking_uri: str = "",
    env: dict[str, str] | None = None,
    pip: list[str] | tuple[str, ...] = (),
    credentials: dict | None = None,
) -> dict:
    """Ray's ``runtime_env`` for a job: code upload, environment variables, extra packages.

    ``pip`` installs packages into a job-private virtualenv on every node (slow the first
    time); leave it empty when the cluster image already has the dependencies.
    ``credentials`` is :func:`unisrec.access.credentials_package`'s part (the package, its
    name, the workers' setup hook), merged in.
    """
    credentials = dict(credentials or {})
    env_vars = {**credentials.pop("env_vars", {}), **(env or {})}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    spec: dict = {"working_dir": str(Path(working_dir).resolve()), "excludes": list(EXCLUDES)}
    if env_vars:
        spec["env_vars"] = env_vars
    if pip:
        spec["pip"] = list(pip)
    return {**spec, **credentials}


def job_spec(
    job: str,
    config: str | Path | None,
    args: list[str] | tuple[str, ...] = (),
    working_dir: str | Path = ".",
    tracking_uri: str = "",
    env: dict[str, str] | None = None,
    pip: list[str] | tuple[str, ...] = (),
    credentials: dict | None = None,
) -> JobSpec:
    """The spec that runs ``unisrec JOB CONFIG ARGS...`` on the cluster (``recommend-batch``
    takes no CONFIG: ``config`` None, its options in ``args``).

    Raises ConfigError when CONFIG is missing or outside ``working_dir`` (the job could not
    read it there).
    """
    root = Path(working_dir).resolve()
    if config is None:
        return JobSpec(
            entrypoint=entrypoint(job, None, args),
            runtime_env=runtime_env(root, tracking_uri, env, pip, credentials),
            metadata={"unisrec.job": job},
        )
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config}")
    if not config_path.is_relative_to(root):
        raise ConfigError(
            f"config {config} is outside the working directory {root}, which is all the job "
            "receives; move it there or pass --working-dir"
        )
    relative = config_path.relative_to(root).as_posix()
    return JobSpec(
        entrypoint=entrypoint(job, relative, args),
        runtime_env=runtime_env(root, tracking_uri, env, pip, credentials),
        metadata={"unisrec.job": job, "unisrec.config": relative},
    )


def submit(address: str, spec: JobSpec, submission_id: str | None = None) -> str:
    """Submit ``spec`` to the cluster whose dashboard is at ``address``; returns the job id."""
    client = _client(address)
    return client.submit_job(
        entrypoint=spec.entrypoint,
        runtime_env=spec.runtime_env,
        metadata=spec.metadata,
        submission_id=submission_id,
    )


def _client(address: str):
    """A Ray Jobs client for ``address``; ConfigError when no cluster answers there."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(address if "://" in address else f"http://{address}")
    try:
        # A refused connection fails here at once, before Ray's client is even imported.
        socket.create_connection((url.hostname or "127.0.0.1", url.port or 8265), timeout=5).close()
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(address)
    except (ConnectionError, OSError) as err:
        raise ConfigError(
            f"--address {address}: no Ray cluster answers there; start one (`ray start --head`, "
            "or `ray up ray_cluster.yaml` then `ray dashboard ray_cluster.yaml`) or pass the "
            "head's dashboard address (--address or $RAY_ADDRESS)"
        ) from err


def wait(address: str, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Block until the job ends; returns its final status (``SUCCEEDED``, ``FAILED``, ``STOPPED``).

    Raises TimeoutError after ``timeout_s`` seconds (None waits for ever).
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL_STATES:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return status


def follow(address: str, job_id: str, out: TextIO | None = None) -> str:
    """Stream the job's logs to ``out`` (default: stdout) until it ends; returns its final status."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    out = out or sys.stdout  # looked up now, so a redirected stdout is honoured

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(stream())
    # The log stream closes as the job ends; its status may lag behind by a moment.
    return wait(address, job_id, timeout_s=60, poll_s=0.2)


def follow_hint(address: str, job_id: str) -> str:
    """How to watch and control a submitted job with Ray's own command line."""
    where = f"--address {shlex.quote(address)}"
    return "\n".join(
        [
            f"  logs:    ray job logs {where} --follow {job_id}",
            f"  status:  ray job status {where} {job_id}",
            f"  stop:    ray job stop {where} {job_id}",
        ]
    )
