"""Where local processes run: loopback settings, free ports, and the one way every job starts
or joins Ray. A local Ray (no cluster address) binds to 127.0.0.1 only.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is first imported: the CLI and
the tests call :func:`use_loopback` before anything imports ray.
"""

from __future__ import annotations

import os
import socket

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


def verbose() -> bool:
    """Whether this process (or the driver that started its Ray) asked for verbose output."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


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
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return True

    ray.init(
        address="local",  # a new local instance, never another user's Ray on this machine
        num_cpus=num_cpus or os.cpu_count(),
        # Ray Train's controller watches its actors through the state API, which the
        # dashboard serves; without it every check logs a warning.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        _node_ip_address="127.0.0.1",
        runtime_env={
            "env_vars": {k: os.environ[k] for k in (*LOOPBACK_ENV, VERBOSE_ENV) if k in os.environ}
        },
        log_to_driver=True,
    )
    return True
