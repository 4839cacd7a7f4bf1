"""UCI Online Retail: each invoice is one sequence of the products bought in it.

``source.path`` is the table itself (CSV, parquet or xlsx) with the UCI columns
``InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country``
(``columns`` may rename ``user`` = InvoiceNo, ``item`` = StockCode, ``text`` =
Description, ``timestamp`` = InvoiceDate and ``quantity`` = Quantity, e.g. for the
"Online Retail II" headers).

An item's text is its most frequent lower-cased description (the first seen among equals).
Dropped and counted whatever ``on_bad_row`` says: rows without a description
(``missing_description``) and cancellations, i.e. invoices starting with "C" or a quantity
below 1 (``cancellation``). Rows of an invoice share one InvoiceDate, so row order sets the
order within it. InvoiceDate is read with ``timestamp_format``, else as ISO 8601 or as the
UCI CSV export writes it (``12/1/2010 8:26``).
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from sharding.config import DomainSource
from sharding.processing import clean_text
from sharding.readers import BadRows, events_frame, require_file
from sharding.readers.csv_table import cell_text, parse_timestamp, table_rows
from sharding.types import EventLog
from unisrec.errors import DataError

DEFAULT_COLUMNS = {
    "user": "InvoiceNo",
    "item": "StockCode",
    "text": "Description",
    "timestamp": "InvoiceDate",
    "quantity": "Quantity",
}
UCI_DATE_FORMAT = "%m/%d/%Y %H:%M"


def read(source: DomainSource) -> EventLog:
    """Read the invoice lines of the table at ``source.path``."""
    path = require_file(Path(source.path))
    col = {**DEFAULT_COLUMNS, **source.columns}
    bad = BadRows(source.name, source.on_bad_row)
    required = [col["user"], col["item"], col["text"], col["timestamp"]]

    descriptions: dict[str, Counter[str]] = {}
    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    orders: list[int] = []
    for line, row in table_rows(path, required, optional=[col["quantity"]]):
        invoice, item = cell_text(row[col["user"]]), cell_text(row[col["item"]])
        description = clean_text(cell_text(row[col["text"]])).lower()
        quantity = _quantity(row.get(col["quantity"], 1))
        timestamp = _invoice_time(row[col["timestamp"]], source.timestamp_format)
        if not invoice or not item:
            field = col["user"] if not invoice else col["item"]
            bad.report("missing_value", DataError("empty value", path, line, field))
        elif quantity is None:
            message = f"not a number: {row[col['quantity']]!r}"
            bad.report("bad_quantity", DataError(message, path, line, col["quantity"]))
        elif invoice.upper().startswith("C") or quantity < 1:
            bad.count("cancellation", f"{path}:{line}: invoice {invoice!r}")
        elif not description:
            bad.count("missing_description", f"{path}:{line}: item {item!r}")
        elif timestamp is None:
            message = f"cannot read {row[col['timestamp']]!r} as a time"
            bad.report("bad_timestamp", DataError(message, path, line, col["timestamp"]))
        else:
            descriptions.setdefault(item, Counter())[description] += 1
            users.append(invoice)
            items.append(item)
            timestamps.append(timestamp)
            orders.append(line)
    return EventLog(
        domain=source.name,
        events=events_frame(users, items, timestamps, orders),
        item_text={item: counts.most_common(1)[0][0] for item, counts in descriptions.items()},
        skipped=bad.log_summary(),
    )


def _quantity(value: object) -> float | None:
    text = cell_text(value)
    if not text:
        return 1.0  # an absent quantity is not a cancellation
    try:
        return float(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=1 << 16)  # an invoice's rows repeat one date; strptime is slow
def _invoice_time(value: object, fmt: str) -> float | None:
    timestamp = parse_timestamp(value, fmt)
    if timestamp is None and not fmt:
        timestamp = parse_timestamp(value, UCI_DATE_FORMAT)
    return timestamp
