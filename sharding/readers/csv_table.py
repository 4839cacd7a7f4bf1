"""Generic tables: an interactions table and an item-text table, CSV or parquet.

In ``source.path``::

    interactions.csv   user,item,timestamp      (file name: ``interactions``, default the
                                                 directory's single ``interactions.*``)
    items.csv          item,text                (file name: ``items``, default ``items.*``)

``columns`` maps the logical names ``user``, ``item``, ``timestamp`` and ``text`` to the
files' column names. Timestamps are unix seconds or ISO 8601 strings
(``timestamp_format: ""``), or strings in a ``strptime`` format; times without a zone are
taken as UTC. Every interaction's item must have text in the items table.

:func:`table_rows` reads CSV (``.tsv`` tab-separated, either gzip-compressed), parquet and
xlsx alike, and :func:`parse_timestamp` / :func:`cell_text` turn their cells into values.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from sharding.config import DomainSource
from sharding.processing import clean_text
from sharding.readers import BadRows, events_frame, require_file, single_file, text_lines
from sharding.types import EventLog
from unisrec.errors import DataError

Row = dict[str, object]


def table_rows(
    path: Path, required: Sequence[str], optional: Sequence[str] = ()
) -> Iterator[tuple[int, Row]]:
    """Yield ``(line, {column: cell})`` for the ``required`` and present ``optional`` columns.

    ``line`` is where a reader finds the row: the line a CSV record starts on (header = 1),
    the sheet row of an xlsx file (header = 1), the 1-based row number of a parquet file.
    CSV cells are strings; parquet and xlsx cells keep their types (None when empty). A
    missing required column raises a DataError naming the column and the file.
    """
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return _parquet_rows(require_file(path), required, optional)
    if name.endswith(".xlsx"):
        return _xlsx_rows(require_file(path), required, optional)
    delimiter = "\t" if name.endswith((".tsv", ".tsv.gz")) else ","
    return _csv_rows(path, required, optional, delimiter)


def cell_text(value: object) -> str:
    """A cell as a stripped string key; ``12.0`` from a numeric cell reads ``"12"``."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
    return str(value).strip()


def parse_timestamp(value: object, fmt: str = "") -> float | None:
    """Unix seconds from a cell, or None when it cannot be read.

    Numbers are unix seconds; ``datetime`` cells (parquet, xlsx) are used as they are;
    strings are parsed with ``fmt`` (``strptime``) or, when ``fmt`` is empty, as a number
    or an ISO 8601 date-time. Date-times without a zone are UTC.
    """
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    elif isinstance(value, str):
        text = value.strip()
        try:
            if fmt:
                moment = dt.datetime.strptime(text, fmt)
            else:
                try:
                    number = float(text)
                except ValueError:
                    moment = dt.datetime.fromisoformat(text)
                else:
                    return number if math.isfinite(number) else None
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def read(source: DomainSource) -> EventLog:
    """Read the interactions and item-text tables of ``source.path``."""
    directory = Path(source.path)
    inter_path = directory / source.interactions if source.interactions else None
    items_path = directory / source.items if source.items else None
    inter_path = inter_path or single_file(directory, "interactions.*", "interactions")
    items_path = items_path or single_file(directory, "items.*", "items")
    col = {name: source.columns.get(name, name) for name in ("user", "item", "timestamp", "text")}
    bad = BadRows(source.name, source.on_bad_row)

    item_text: dict[str, str] = {}
    for line, row in table_rows(items_path, [col["item"], col["text"]]):
        item, text = cell_text(row[col["item"]]), cell_text(row[col["text"]])
        if not item:
            bad.report("missing_value", DataError("empty value", items_path, line, col["item"]))
        elif not clean_text(text):
            bad.report("empty_text", DataError("empty text", items_path, line, col["text"]))
        elif item in item_text:
            bad.count("duplicate_item", f"{items_path}:{line}: item {item!r} again; first kept")
        else:
            item_text[item] = text

    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    orders: list[int] = []
    how = f"format {source.timestamp_format!r}" if source.timestamp_format else "unix or ISO 8601"
    for line, row in table_rows(inter_path, [col["user"], col["item"], col["timestamp"]]):
        user, item = cell_text(row[col["user"]]), cell_text(row[col["item"]])
        timestamp = parse_timestamp(row[col["timestamp"]], source.timestamp_format)
        if not user or not item:
            field = col["user"] if not user else col["item"]
            bad.report("missing_value", DataError("empty value", inter_path, line, field))
        elif timestamp is None:
            message = f"cannot read {row[col['timestamp']]!r} as a time ({how})"
            bad.report("bad_timestamp", DataError(message, inter_path, line, col["timestamp"]))
        elif item not in item_text:
            message = f"item {item!r} has no text in {items_path.name}"
            bad.report("unknown_item", DataError(message, inter_path, line, col["item"]))
        else:
            users.append(user)
            items.append(item)
            timestamps.append(timestamp)
            orders.append(line)
    return EventLog(
        domain=source.name,
        events=events_frame(users, items, timestamps, orders),
        item_text=item_text,
        skipped=bad.log_summary(),
    )


def _columns_present(
    path: Path, header: list[str], required: Sequence[str], optional: Sequence[str]
) -> dict[str, int]:
    for name in required:
        if name not in header:
            raise DataError(f"missing column (file has: {', '.join(header)})", path, 1, name)
    return {name: header.index(name) for name in (*required, *optional) if name in header}


def _csv_rows(
    path: Path, required: Sequence[str], optional: Sequence[str], delimiter: str
) -> Iterator[tuple[int, Row]]:
    # The csv module refuses fields over 131,072 characters; a long item description is read
    # whole and cut to processing.max_text_chars later (and counted there).
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader((line for _, line in text_lines(path, keep_ends=True)), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader, [])]
        wanted = _columns_present(path, header, required, optional)
        start = reader.line_num + 1
        for values in reader:
            # A quoted field may span lines: the record starts where the last one ended.
            line, start = start, reader.line_num + 1
            if not values:
                continue
            if len(values) != len(header):
                message = f"expected {len(header)} values, got {len(values)}"
                raise DataError(message, path, line)
            yield line, {name: values[i] for name, i in wanted.items()}
    except csv.Error as err:
        raise DataError(f"malformed CSV: {err}", path, reader.line_num) from None


def _parquet_rows(
    path: Path, required: Sequence[str], optional: Sequence[str]
) -> Iterator[tuple[int, Row]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        wanted = _columns_present(path, table.schema_arrow.names, required, optional)
        line = 0
        for batch in table.iter_batches(columns=list(wanted)):
            columns = batch.to_pydict()
            for values in zip(*columns.values(), strict=True):
                line += 1
                yield line, dict(zip(columns, values, strict=True))
    except pa.ArrowException as err:
        raise DataError(f"unreadable parquet file: {err}", path) from None


def _xlsx_rows(
    path: Path, required: Sequence[str], optional: Sequence[str]
) -> Iterator[tuple[int, Row]]:
    from openpyxl import load_workbook
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        workbook = load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError, OSError) as err:
        raise DataError(f"unreadable xlsx file: {err}", path) from None
    try:
        rows = workbook.worksheets[0].iter_rows(values_only=True)
        header = [cell_text(cell) for cell in next(rows, ())]
        wanted = _columns_present(path, header, required, optional)
        for line, values in enumerate(rows, start=2):
            if all(cell is None for cell in values):
                continue
            yield line, {name: values[i] if i < len(values) else None for name, i in wanted.items()}
    finally:
        workbook.close()
