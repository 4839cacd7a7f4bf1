"""One pretraining run at a time per output directory.

A second run on the same ``output_dir`` would resume, checkpoint and register over the
first one's files. The driver holds an exclusive ``flock`` on ``<output_dir>/.lock`` for the
whole job; the file says who holds it (run id, pid, host, start time), so a refused run can
name the holder. The kernel drops the lock when the holder's process ends, however it ends:
a stale lock file from a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from unisrec.errors import StorageError

LOCK_FILE = ".lock"


class OutputDirLock:
    """Exclusive hold of an output directory, taken before anything in it is written.

    ``with OutputDirLock(out) as lock: ... lock.describe(run_id=...)``; raises
    :class:`StorageError` naming the holder when another process holds it.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115  (held until __exit__)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "{}"
            handle.close()
            raise StorageError(
                f"{self.path.parent}: in use by another pretraining run ({_holder(holder)}); "
                "wait for it, stop it, or choose another output_dir"
            ) from None
        self._file = handle
        self.describe()
        return self

    def describe(self, **fields) -> None:
        """Record who holds the lock (pid, host, start time and ``fields``, e.g. run_id)."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), **fields}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(info))
        self._file.flush()

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return "holder unknown"
    run = f"run {info['run_id']}, " if info.get("run_id") else ""
    return f"{run}pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
