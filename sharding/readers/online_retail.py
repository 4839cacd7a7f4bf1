"""UCI Online Retail, processed as the UniSRec paper did: each invoice is one sequence.

``source.path`` is the table itself (CSV, parquet or xlsx) with the UCI columns
``InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice, CustomerID, Country``
(``columns`` may rename ``user`` = InvoiceNo, ``item`` = StockCode, ``text`` =
Description, ``timestamp`` = InvoiceDate and ``quantity`` = Quantity, e.g. for the
"Online Retail II" headers).

The paper's rules (its Table 2 counts 16,520 users, 3,469 items and 519,906 interactions
on the UCI file after them):

- user = InvoiceNo, every invoice, cancellations ("C536379") included; CustomerID is unused;
- item = StockCode as written;
- rows without a description are dropped (counted as ``missing_description``);
- rows equal in (invoice, item, quantity, invoice time) are one interaction (processing
  counts the others as ``duplicate``); the same item twice in one invoice at one time with
  different quantities stays two interactions;
- an item's text is the first non-empty description of its StockCode in file order,
  stripped, lower-cased, with a period appended ("white metal lantern.");
- then processing's iterative k-core (5 by default).

``drop_cancellations: true`` also drops cancellations, i.e. invoices starting with "C" or a
quantity below 1 (counted as ``cancellation``). All lines of an invoice share one
InvoiceDate, so their order is a tie: this format's ``tie_order`` defaults to ``shuffle``
(docs/data-format.md, "Tie groups"). InvoiceDate is read with ``timestamp_format``, else as
ISO 8601 or as the UCI CSV export writes it (``12/1/2010 8:26``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sharding.config import DomainSource
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

    item_text: dict[str, str] = {}
    users: list[str] = []
    items: list[str] = []
    quantities: list[float] = []
    timestamps: list[float] = []
    orders: list[int] = []
    for line, row in table_rows(path, required, optional=[col["quantity"]]):
        invoice, item = cell_text(row[col["user"]]), cell_text(row[col["item"]])
        description = cell_text(row[col["text"]])
        if item and description and item not in item_text:
            item_text[item] = description.lower() + "."  # the paper's text, first seen wins
        quantity = _quantity(row.get(col["quantity"], 1))
        timestamp = _invoice_time(row[col["timestamp"]], source.timestamp_format)
        if not invoice or not item:
            field = col["user"] if not invoice else col["item"]
            bad.report("missing_value", DataError("empty value", path, line, field))
        elif quantity is None:
            message = f"not a number: {row[col['quantity']]!r}"
            bad.report("bad_quantity", DataError(message, path, line, col["quantity"]))
        elif source.drop_cancellations and (invoice.upper().startswith("C") or quantity < 1):
            bad.count("cancellation", f"{path}:{line}: invoice {invoice!r}")
        elif not description:
            bad.count("missing_description", f"{path}:{line}: item {item!r}")
        elif timestamp is None:
            message = f"cannot read {row[col['timestamp']]!r} as a time"
            bad.report("bad_timestamp", DataError(message, path, line, col["timestamp"]))
        else:
            users.append(invoice)
            items.append(item)
            quantities.append(quantity)
            timestamps.append(timestamp)
            orders.append(line)
    events = events_frame(users, items, timestamps, orders)
    events["quantity"] = np.asarray(quantities, dtype=np.float64)
    return EventLog(
        domain=source.name,
        events=events,
        item_text=item_text,
        skipped=bad.log_summary(),
        duplicate_key=("user", "item", "quantity", "timestamp"),
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
