"""The error types every job raises for input or storage it cannot use.

* :class:`ConfigError`: a configuration key or value is wrong; the message names the dotted key.
* :class:`DataError`: bad input data; the message names the file, line and field.
* :class:`StorageError`: where the job writes cannot take it (the disk is full, another run
  holds the directory); the message names the path.

The CLI turns each into one ``error:`` line and exit status 2. None of them goes away by
retrying, so a distributed job does not spend its restarts on them.
"""

from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the dotted key."""


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE:LINE: field 'F': what is wrong``."""

    def __init__(
        self,
        message: str,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        where = self.file or ""
        if line is not None:
            where += f":{line}"
        parts = [p for p in (where, f"field '{field}'" if field else "") if p]
        super().__init__(": ".join(parts + [message]))


class StorageError(RuntimeError):
    """A place the job writes to cannot take it; ``str(err)`` names the path and why."""
