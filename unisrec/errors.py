"""The two error types every job raises for input it cannot use.

* :class:`ConfigError`: a configuration key or value is wrong; the message names the dotted key.
* :class:`DataError`: bad input data; the message names the file, line and field.

The CLI turns either into one ``error:`` line and exit status 2.
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
