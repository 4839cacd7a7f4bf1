"""Readers that turn one domain's raw files into :class:`~sharding.types.DomainSequences`.

``read_domain(source, processing)`` picks the reader named by ``source.format``:

=================  ==========================================================  ==============
format             files                                                       module
=================  ==========================================================  ==============
unisrec-atomic     the UniSRec authors' ``X.text``, ``X.{train,valid,test}``   unisrec_atomic
                   ``.inter``, ``X.item2index``, ``X.user2index``; the given
                   split is kept as it is
recbole-atomic     RecBole ``X.inter`` + ``X.item``                            recbole_atomic
csv                interactions + item texts, CSV or parquet                   csv_table
amazon-2018        raw Amazon reviews + ``meta_`` JSON lines, gzip or plain    amazon2018
online-retail      UCI Online Retail table, CSV / parquet / xlsx               online_retail
=================  ==========================================================  ==============

Every reader but unisrec-atomic returns an :class:`~sharding.types.EventLog` that
:func:`sharding.processing.build_sequences` filters, orders and indexes; equal timestamps of
one user are ordered as ``tie_order`` says (per domain, else ``processing``, else the format's
default: ``shuffle`` for online-retail, ``file`` for the others).

This module also holds what all readers share: :func:`text_lines` (strict UTF-8 lines that
name the line a bad byte is on) and :class:`BadRows` (raise, or count and skip, as
``on_bad_row`` says). Readers are imported on use, so reading one format does not import
the libraries of the others.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from sharding.config import FORMATS, DomainSource, ProcessingConfig, resolve_tie_order
from sharding.processing import build_sequences, clean_text
from sharding.types import DomainSequences
from unisrec.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"


def read_domain(source: DomainSource, processing: ProcessingConfig) -> DomainSequences:
    """Read, clean and index one domain as ``source.format`` says."""
    if source.format == "unisrec-atomic":
        from sharding.readers import unisrec_atomic

        domain = unisrec_atomic.read(source)
        # The given split is kept, so no filtering: only cut texts to the configured length.
        domain.item_texts = [clean_text(t, processing.max_text_chars) for t in domain.item_texts]
        return domain
    if source.format == "recbole-atomic":
        from sharding.readers import recbole_atomic as reader
    elif source.format == "csv":
        from sharding.readers import csv_table as reader
    elif source.format == "amazon-2018":
        from sharding.readers import amazon2018 as reader
    elif source.format == "online-retail":
        from sharding.readers import online_retail as reader
    else:
        raise ConfigError(f"format: unknown format {source.format!r}; known: {', '.join(FORMATS)}")
    return build_sequences(
        reader.read(source),
        processing,
        kcore=source.kcore,
        tie_order=resolve_tie_order(source, processing),
    )


def events_frame(
    users: list[str], items: list[str], timestamps: list[float], orders: list[int]
) -> pd.DataFrame:
    """The ``EventLog.events`` table, with the column dtypes processing relies on."""
    return pd.DataFrame(
        {
            "user": pd.Series(users, dtype=str),
            "item": pd.Series(items, dtype=str),
            "timestamp": np.asarray(timestamps, dtype=np.float64),
            "order": np.asarray(orders, dtype=np.int64),
        }
    )


def require_file(path: Path) -> Path:
    """``path`` if it is a file, else a DataError naming it."""
    if not path.is_file():
        raise DataError("file not found", file=path)
    return path


def text_lines(path: Path, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` from a UTF-8 text file, gzip-compressed or plain.

    Line numbers start at 1. A byte sequence that is not UTF-8 raises a DataError naming the
    file and line. Line ends are removed unless ``keep_ends`` (the csv module needs them to
    read quoted fields that span lines), and a leading byte-order mark is dropped. Reads one
    line at a time, so files of any size stream.
    """
    require_file(path)
    with open(path, "rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    with gzip.open(path, "rb") if compressed else open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"not valid UTF-8: byte {raw[err.start]:#04x} at column {err.start + 1}",
                    file=path,
                    line=number,
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            yield number, line if keep_ends else line.rstrip("\r\n")


def single_file(directory: Path, pattern: str, option: str) -> Path:
    """The one file in ``directory`` matching ``pattern``; ``option`` names the config key
    that picks one when there are none or several."""
    if not directory.is_dir():
        raise DataError("directory not found", file=directory)
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(
            f"expected exactly one {pattern} file (found: {names}); set '{option}'",
            file=directory,
            field=option,
        )
    return found[0]


class BadRows:
    """Applies ``on_bad_row``: ``error`` raises the DataError, ``skip`` counts it by reason.

    Skips are logged as one warning per reason by :meth:`log_summary`, quoting the first
    occurrence, rather than one line per row of a file that may have millions.
    """

    def __init__(self, domain: str, on_bad_row: str):
        self.domain = domain
        self.on_bad_row = on_bad_row
        self.counts: Counter[str] = Counter()
        self._first: dict[str, str] = {}

    def report(self, reason: str, error: DataError) -> None:
        """Raise ``error``, or count it under ``reason`` when skipping."""
        if self.on_bad_row != "skip":
            raise error
        self.count(reason, str(error))

    def count(self, reason: str, example: str, n: int = 1) -> None:
        """Count ``n`` rows under ``reason`` without raising: for rows the format always drops."""
        self.counts[reason] += n
        self._first.setdefault(reason, example)

    def log_summary(self) -> dict[str, int]:
        """Warn once per reason and return the counts as a plain dict."""
        for reason, n in self.counts.items():
            logger.warning(
                "%s: skipped %d rows (%s), first: %s", self.domain, n, reason, self._first[reason]
            )
        return dict(self.counts)
