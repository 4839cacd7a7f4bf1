"""RecBole atomic files: ``X.inter`` and ``X.item``, tab-separated, ``name:type`` headers.

::

    X.inter   user_id:token  item_id:token  rating:float  timestamp:float
    X.item    item_id:token  movie_title:token_seq  release_year:token  class:token_seq

An item's text joins its ``text_fields`` (default: every ``token_seq`` field, in header
order) with ". ", e.g. ``Toy Story. Animation Children's Comedy``. ``columns`` may rename
the ``user``, ``item`` and ``timestamp`` fields (defaults ``user_id``, ``item_id``,
``timestamp``). Without a timestamp field, file order is interaction order.

:func:`atomic_header` and :func:`atomic_rows` read any atomic file; the UniSRec authors'
files use the same layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

from sharding.config import DomainSource
from sharding.processing import clean_text
from sharding.readers import BadRows, events_frame, single_file, text_lines
from sharding.types import EventLog
from unisrec.errors import DataError

DEFAULT_COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp"}


def atomic_header(path: Path) -> dict[str, str]:
    """Field name -> RecBole type (``token``, ``token_seq``, ``float``, ...), in file order."""
    lines = text_lines(path)
    try:
        return _parse_header(path, next(lines, (1, ""))[1])
    finally:
        lines.close()


def atomic_rows(path: Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, {field: value})`` for each data line of an atomic file.

    Raises a DataError naming the field when a ``required`` field is not in the header, and
    naming the line when its number of tab-separated values differs from the header's.
    Blank lines are passed over.
    """
    lines = text_lines(path)
    names = list(_parse_header(path, next(lines, (1, ""))[1]))
    for name in required:
        if name not in names:
            raise DataError(f"missing field (header has: {', '.join(names)})", path, 1, name)
    for number, line in lines:
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) != len(names):
            raise DataError(
                f"expected {len(names)} tab-separated values, got {len(values)}", path, number
            )
        yield number, dict(zip(names, values, strict=True))


def _parse_header(path: Path, line: str) -> dict[str, str]:
    if not line.strip():
        raise DataError("expected a header of name:type fields", path, 1)
    fields: dict[str, str] = {}
    for entry in line.split("\t"):
        name, sep, kind = entry.partition(":")
        if not sep or not name:
            raise DataError(f"header entry {entry!r} is not name:type", path, 1)
        fields[name] = kind
    return fields


def read(source: DomainSource) -> EventLog:
    """Read ``X.inter`` and ``X.item`` from ``source.path`` (``X`` = ``source.dataset``, or
    the stem of the directory's single ``.inter`` file)."""
    directory = Path(source.path)
    stem = source.dataset or single_file(directory, "*.inter", "dataset").stem
    columns = {**DEFAULT_COLUMNS, **source.columns}
    bad = BadRows(source.name, source.on_bad_row)
    item_text = _read_item_text(directory / f"{stem}.item", source, columns["item"], bad)

    inter_path = directory / f"{stem}.inter"
    user_col, item_col, time_col = columns["user"], columns["item"], columns["timestamp"]
    has_time = time_col in atomic_header(inter_path)
    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    orders: list[int] = []
    for number, row in atomic_rows(inter_path, required=(user_col, item_col)):
        user, item = row[user_col].strip(), row[item_col].strip()
        if not user or not item:
            field = user_col if not user else item_col
            bad.report("missing_value", DataError("empty value", inter_path, number, field))
            continue
        timestamp = _parse_timestamp(row[time_col]) if has_time else 0.0
        if timestamp is None:
            error = DataError(f"not a number: {row[time_col]!r}", inter_path, number, time_col)
            bad.report("bad_timestamp", error)
            continue
        if item not in item_text:
            error = DataError(
                f"item {item!r} has no text in {stem}.item", inter_path, number, item_col
            )
            bad.report("unknown_item", error)
            continue
        users.append(user)
        items.append(item)
        timestamps.append(timestamp)
        orders.append(number)
    return EventLog(
        domain=source.name,
        events=events_frame(users, items, timestamps, orders),
        item_text=item_text,
        skipped=bad.log_summary(),
    )


def _read_item_text(
    path: Path, source: DomainSource, item_col: str, bad: BadRows
) -> dict[str, str]:
    header = atomic_header(path)
    fields = source.text_fields or [name for name, kind in header.items() if kind == "token_seq"]
    if not fields:
        raise DataError(
            "no token_seq field to form item text; set text_fields", path, 1, "text_fields"
        )
    item_text: dict[str, str] = {}
    for number, row in atomic_rows(path, required=(item_col, *fields)):
        item = row[item_col].strip()
        text = ". ".join(part for f in fields if (part := row[f].strip()))
        if not item or not clean_text(text):
            field = item_col if not item else ",".join(fields)
            bad.report("empty_text", DataError("empty value", path, number, field))
            continue
        if item in item_text:
            bad.count("duplicate_item", f"{path}:{number}: item {item!r} listed again; first kept")
            continue
        item_text[item] = text
    return item_text


def _parse_timestamp(value: str) -> float | None:
    try:
        timestamp = float(value)
    except ValueError:
        return None
    return timestamp if math.isfinite(timestamp) else None
