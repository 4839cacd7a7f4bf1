"""Raw Amazon review data (2018 release): reviews and item metadata as JSON lines.

In ``source.path`` (gzip-compressed or plain; names from ``interactions`` / ``items``, else
found by pattern)::

    <Category>.json.gz        {"reviewerID": "A2...", "asin": "B00...", "unixReviewTime": 1424304000, ...}
    meta_<Category>.json.gz   {"asin": "B00...", "title": "...", "category": [...], "brand": "...", ...}

An item's text is ``"<title>. <categories joined by spaces>. <brand>."``, the layout of the
UniSRec authors' ``.text`` files; missing parts are left out. Metadata lines without a title
are dropped and counted (``item_without_title``); reviews of items with no text are dropped
later by :func:`sharding.processing.build_sequences` (``item_without_text``). Both files are
read one line at a time, and only the metadata of reviewed items is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sharding.config import DomainSource
from sharding.processing import clean_text
from sharding.readers import BadRows, events_frame, single_file, text_lines
from sharding.types import EventLog
from unisrec.errors import DataError

JSON_PATTERNS = ("*.json", "*.json.gz", "*.jsonl", "*.jsonl.gz")


def item_text(meta: dict) -> str:
    """``"Title. Cat1 Cat2. Brand."`` from one metadata record; "" without a title."""
    title = meta.get("title")
    if not isinstance(title, str) or not clean_text(title):
        return ""
    categories = meta.get("category")
    category = (
        " ".join(c for c in categories if isinstance(c, str))
        if isinstance(categories, list)
        else ""
    )
    brand = meta.get("brand")
    parts = [title, category, brand if isinstance(brand, str) else ""]
    # A title that already ends in "." (or "...") must not end up with two.
    return " ".join(f"{part.strip().rstrip('.')}." for part in parts if part.strip().rstrip("."))


def read(source: DomainSource) -> EventLog:
    """Read the reviews, then the metadata of the reviewed items."""
    directory = Path(source.path)
    reviews_path, meta_path = _find_files(directory, source)
    bad = BadRows(source.name, source.on_bad_row)

    users: list[str] = []
    items: list[str] = []
    timestamps: list[float] = []
    orders: list[int] = []
    for line, record in _json_lines(reviews_path, bad):
        user, item = record.get("reviewerID"), record.get("asin")
        timestamp = record.get("unixReviewTime")
        if not isinstance(user, str) or not user.strip():
            bad.report(
                "missing_value", DataError("missing or empty", reviews_path, line, "reviewerID")
            )
        elif not isinstance(item, str) or not item.strip():
            bad.report("missing_value", DataError("missing or empty", reviews_path, line, "asin"))
        elif not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            message = f"expected unix seconds, got {timestamp!r}"
            bad.report("bad_timestamp", DataError(message, reviews_path, line, "unixReviewTime"))
        else:
            users.append(user.strip())
            items.append(item.strip())
            timestamps.append(float(timestamp))
            orders.append(line)

    reviewed = set(items)
    texts: dict[str, str] = {}
    for line, meta in _json_lines(meta_path, bad):
        asin = meta.get("asin")
        if not isinstance(asin, str) or not asin.strip():
            bad.report("missing_value", DataError("missing or empty", meta_path, line, "asin"))
            continue
        asin = asin.strip()
        if asin not in reviewed or asin in texts:  # the 2018 metadata repeats some items
            continue
        text = item_text(meta)
        if text:
            texts[asin] = text
        else:
            bad.count("item_without_title", f"{meta_path}:{line}: item {asin!r} has no title")
    return EventLog(
        domain=source.name,
        events=events_frame(users, items, timestamps, orders),
        item_text=texts,
        skipped=bad.log_summary(),
    )


def _find_files(directory: Path, source: DomainSource) -> tuple[Path, Path]:
    if source.items:
        meta_path = directory / source.items
    else:
        meta_path = single_file(directory, "meta_*.json*", "items")
    if source.interactions:
        return directory / source.interactions, meta_path
    candidates = sorted(
        {p for pattern in JSON_PATTERNS for p in directory.glob(pattern)}
        - set(directory.glob("meta_*"))
    )
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        message = f"expected exactly one reviews file (found: {names}); set 'interactions'"
        raise DataError(message, directory, field="interactions")
    return candidates[0], meta_path


def _json_lines(path: Path, bad: BadRows) -> Iterator[tuple[int, dict]]:
    """Yield ``(line, record)`` for each JSON object line; blank lines are passed over."""
    for line, text in text_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            bad.report("bad_json", DataError(f"not valid JSON: {err.msg}", path, line))
            continue
        if not isinstance(record, dict):
            bad.report("bad_json", DataError("expected a JSON object", path, line))
            continue
        yield line, record
