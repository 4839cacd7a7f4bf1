"""Every measured figure in the docs comes from a file committed in the repo.

A table of measurements (every table in ``docs/benchmarks.md`` and ``docs/results.md``, and
any table elsewhere in ``docs/`` that names a source) is preceded, after the previous table
or heading, by a line naming the files its numbers come from::

    source: `benchmarks/results/finetune.json`, `benchmarks/results/serving.json`

Every number in the table's cells, except the first column (what the row is) and the header,
must be one of those files' numbers as printed: a JSON number (or one in a JSON Lines file)
rounded to the printed decimals, directly or as a percentage, in milli- or kilo- units, or
bytes in MiB/GiB. Figures from elsewhere (the paper, other systems) are printed in italics
(``*0.1188*``) and are not checked; a table of such figures only needs no source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
ALWAYS_CHECKED = ("benchmarks.md", "results.md")
SOURCE_LINE = re.compile(r"^source:\s*(.+)$", re.IGNORECASE)
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
# How a printed number may be scaled from the JSON value: as is, percent, milli/kilo units,
# bytes in MiB and GiB.
SCALES = (1.0, 100.0, 1e3, 1e-3, 1e6, 1e-6, 2.0**-20, 2.0**-30)


def tables(text: str) -> list[tuple[int, list[str], list[str]]]:
    """``(first line number, its source paths, its lines)`` for each markdown table. The
    source is the last ``source:`` line between the previous table or heading and this one."""
    found, source, rows, start = [], [], [], 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("|"):
            if not rows:
                start = number
            rows.append(line)
            continue
        if rows:
            found.append((start, source, rows))
            rows, source = [], []
        if line.startswith("#"):
            source = []
        match = SOURCE_LINE.match(line.strip())
        if match:
            source = re.findall(r"`([^`]+)`", match.group(1))
    if rows:
        found.append((start, source, rows))
    return found


def json_numbers(path: Path) -> list[float]:
    """Every number in a JSON or JSON Lines file (booleans excluded)."""
    text = path.read_text(encoding="utf-8")
    try:
        documents = [json.loads(text)]
    except json.JSONDecodeError:
        documents = [json.loads(line) for line in text.splitlines() if line.strip()]
    values: list[float] = []

    def walk(node) -> None:
        if isinstance(node, bool):
            return
        if isinstance(node, int | float):
            values.append(float(node))
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for document in documents:
        walk(document)
    return values


def printed_numbers(cell: str) -> list[tuple[float, int]]:
    """``(value, decimals)`` of each number printed in a cell, skipping the digits of names
    (``p99``, ``bf16``, ``ZeRO-2``, commit ids) and italic cells."""
    cell = cell.strip()
    if cell.startswith("*") and cell.endswith("*") and not cell.startswith("**"):
        return []
    out = []
    for match in NUMBER.finditer(cell):
        before = cell[match.start() - 1] if match.start() else " "
        after = cell[match.end()] if match.end() < len(cell) else " "
        if (
            before.isalnum()
            and before != "x"
            or before in "_-"
            and match.start() > 1
            and (cell[match.start() - 2].isalpha())
        ):
            continue
        if after.isalpha() and after not in "xs":
            continue
        token = match.group().replace(",", "").lstrip("+")
        decimals = len(token.split(".")[1]) if "." in token else 0
        out.append((float(token), decimals))
    return out


def matches(value: float, decimals: int, candidates: list[float]) -> bool:
    tolerance = 0.5 * 10.0**-decimals + 1e-9
    return any(abs(c * scale - value) <= tolerance for c in candidates for scale in SCALES)


def checked_tables():
    for doc in sorted(DOCS.glob("*.md")):
        for start, source, rows in tables(doc.read_text(encoding="utf-8")):
            if doc.name in ALWAYS_CHECKED or source:
                yield pytest.param(doc, start, source, rows, id=f"{doc.name}:{start}")


@pytest.mark.parametrize(("doc", "start", "source", "rows"), list(checked_tables()))
def test_every_number_in_a_measurement_table_is_in_its_source_file(doc, start, source, rows):
    where = f"{doc.relative_to(ROOT)}:{start}"
    cells = [cell for row in rows[2:] for cell in row.strip().strip("|").split("|")[1:]]
    if not any(printed_numbers(cell) for cell in cells):
        return  # figures from elsewhere only (italics), or no figures
    assert source, f"{where}: table names no source (a 'source: `FILE.json`' line before it)"
    candidates: list[float] = []
    for name in source:
        path = ROOT / name
        assert path.is_file(), f"{where}: source {name} is not a file in the repo"
        candidates += json_numbers(path)
    missing = []
    for row in rows[2:]:  # header and its rule line are not measurements
        for cell in row.strip().strip("|").split("|")[1:]:
            for value, decimals in printed_numbers(cell):
                if not matches(value, decimals, candidates):
                    missing.append(f"{value:.{decimals}f} in '{cell.strip()}'")
    assert not missing, f"{where}: not in {', '.join(source)}: " + "; ".join(missing)


def test_the_checker_finds_a_number_missing_from_its_source(tmp_path):
    data = tmp_path / "r.json"
    data.write_text(json.dumps({"epoch_s": 12.34, "rss_bytes": 1.5 * 2**30, "share": 0.123}))
    assert matches(12.3, 1, json_numbers(data))
    assert matches(1.50, 2, json_numbers(data))  # GiB
    assert matches(12.3, 1, json_numbers(data))  # percent of 0.123
    assert not matches(12.4, 1, json_numbers(data))
    assert printed_numbers("**x2.3** at p99, ZeRO-2, bf16 (5da26b7)") == [(2.3, 1)]
    assert printed_numbers("-18.3%, +13.4%") == [(-18.3, 1), (13.4, 1)]
    assert printed_numbers("*0.1188*") == []
    text = "# A\nsource: `r.json`\n\n| a | b |\n|---|---|\n| x | 1 |\n\n| c |\n|---|\n"
    assert [(start, source) for start, source, _ in tables(text)] == [(4, ["r.json"]), (8, [])]
