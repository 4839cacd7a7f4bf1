"""Where local processes run: loopback settings, free ports, and the one way every job starts
or joins Ray. A local Ray (no cluster address) binds to 127.0.0.1 only.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first imported: the CLI and
the tests call :func:`use_loopback` before anything imports ray.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import logging
import os
import socket
from collections.abc import Iterator

LOOPBACK_ENV = {
    # Ray's own default binds the node to the machine's network address; this keeps the
    # raylet, object store and the gloo groups Ray Train creates on 127.0.0.1.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "MASTER_ADDR": "127.0.0.1",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
}


VERBOSE_ENV = "UNISREC_VERBOSE"  # "1": Ray's chatter and known warnings are shown (`unisrec -v`)

# Library chatter a user does not act on, off unless -v; read by each process as it starts,
# so Ray workers get them too (ensure_ray passes them on).
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "ERROR",  # table creation, pickle and signature advice
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar too
    "TRANSFORMERS_VERBOSITY": "error",
    # torch's deprecation notes for the collectives DeepSpeed's ZeRO calls; MLflow's advice
    # to log an input example with a pyfunc
    "PYTHONWARNINGS": ",".join(
        [
            "ignore::FutureWarning:torch.distributed.c10d_logger",
            "ignore::UserWarning:mlflow.pyfunc",
        ]
    ),
}


def verbose() -> bool:
    """Whether this process (or the driver that started its Ray) asked for verbose output."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def quiet_libraries() -> None:
    """Unless verbose: :data:`QUIET_ENV` for this process and those it starts (values the
    user set are kept)."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Unless verbose, hold back what a library prints inside the block (DeepSpeed prints op
    builds and checkpoint merges with ``print``, and its merge shows a progress bar). ``print`` itself is held too:
    in a Ray Train worker it is patched to write past ``sys.stdout``."""
    if verbose():
        yield
        return
    held = io.StringIO()
    original = builtins.print
    builtins.print = functools.partial(original, file=held)
    try:
        with contextlib.redirect_stdout(held), contextlib.redirect_stderr(held):
            yield
    finally:
        builtins.print = original


def cpu_deepspeed() -> None:
    """Tell DeepSpeed it runs on CPU when there is no GPU, instead of letting it warn that it
    guessed so (call before importing deepspeed)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def quiet_train_worker() -> None:
    """In a Ray Train worker, unless verbose: drop the per-report "Reporting training result"
    line (logged under a file-path logger name, outside ``ray.train``'s level) and torch's
    deprecation warning for the collective DeepSpeed's ZeRO calls."""
    if verbose():
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor", category=FutureWarning)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def use_loopback() -> None:
    """Keep a local Ray and its gloo groups on 127.0.0.1 (unless joining a cluster)."""
    if os.environ.get("RAY_ADDRESS"):
        return
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (another process may still take it first)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def ensure_ray(address: str = "", num_cpus: int | None = None) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local loopback-only Ray.

    Returns True when this call started or joined Ray (the caller may shut it down again),
    False when Ray was already initialised.
    """
    use_loopback()  # before the first import of ray
    quiet_libraries()
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return True

    dashboard_port = free_port()
    env = {
        k: os.environ[k]
        for k in (*LOOPBACK_ENV, VERBOSE_ENV, *QUIET_ENV, "DS_ACCELERATOR")
        if k in os.environ
    }
    # Ray Train's placement-group cleaner finds the state API by looking for "the" local Ray;
    # with another Ray instance on the machine (an endpoint, another job) it fails with a
    # traceback. Name this instance's API server to it.
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        address="local",  # a new local instance, never another user's Ray on this machine
        num_cpus=num_cpus or os.cpu_count(),
        # Ray Train's controller watches its actors through the state API, which the
        # dashboard serves; without it every check logs a warning.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        logging_level=logging.INFO if verbose() else logging.WARNING,
        log_to_driver=True,
    )
    return True
