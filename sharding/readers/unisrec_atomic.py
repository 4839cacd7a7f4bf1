"""The UniSRec authors' preprocessed files, read with their split kept as it is.

In ``source.path``, for ``X`` = ``source.dataset`` or the stem of the single ``*.text``::

    X.item2index    ASIN<TAB>0-based item index          (no header)
    X.user2index    reviewer<TAB>0-based user index      (no header)
    X.text          item_id:token  text:token_seq        (item_id = ASIN)
    X.train.inter   user_id:token  item_id_list:token_seq  item_id:token
    X.valid.inter   (same fields)
    X.test.inter    (same fields)

Inter rows hold indexes: ``user_id`` into user2index, the space-separated history
``item_id_list`` and the target ``item_id`` into item2index. Train holds every
prefix -> next-item pair of a user's training part, valid and test one leave-one-out row
each; every history is cut to its last ``cap`` items (50 in the released data).

A user's whole sequence is rebuilt as the first train history item, then the train targets
in order, then the valid and the test target (a user without train rows starts from the
valid history). Every row is then checked against it: a history must equal the last
``min(position, cap)`` items before its target, where ``cap`` is the longest history in the
files. A row that does not fit is a DataError naming its file and line (with
``on_bad_row: skip`` the user is dropped and counted instead). Item local index is the
item2index index + 1; no k-core or re-split is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sharding.config import DomainSource
from sharding.processing import clean_text
from sharding.readers import BadRows, require_file, single_file, text_lines
from sharding.readers.recbole_atomic import atomic_rows
from sharding.types import DomainSequences
from unisrec.errors import DataError

SPLITS = ("train", "valid", "test")
INTER_FIELDS = ("user_id", "item_id_list", "item_id")


@dataclass(frozen=True)
class InterRow:
    """One prefix -> next-item row of an inter file, as 0-based indexes."""

    file: Path
    line: int
    history: tuple[int, ...]
    target: int


def read(source: DomainSource) -> DomainSequences:
    """Read the domain in ``source.path``; item texts are cleaned but not cut."""
    directory = Path(source.path)
    stem = source.dataset or single_file(directory, "*.text", "dataset").stem
    bad = BadRows(source.name, source.on_bad_row)
    index_path = directory / f"{stem}.item2index"
    item_keys, item_lines = read_index(index_path)
    user_keys, _ = read_index(directory / f"{stem}.user2index")
    texts = _read_texts(directory / f"{stem}.text", bad)
    for key, line in zip(item_keys, item_lines, strict=True):
        if key not in texts:
            error = DataError(f"item {key!r} has no text in {stem}.text", index_path, line, "text")
            bad.report("item_without_text", error)
    textless = {i for i, key in enumerate(item_keys) if key not in texts}

    rows = {
        split: _read_inter(directory / f"{stem}.{split}.inter", len(user_keys), len(item_keys))
        for split in SPLITS
    }
    histories = (r.history for by_user in rows.values() for rs in by_user.values() for r in rs)
    cap = max(map(len, histories), default=0)

    kept_users: list[str] = []
    sequences: list[np.ndarray] = []
    for user in sorted(set().union(*rows.values())):
        try:
            sequence = _rebuild(user_keys[user], [rows[s].get(user, []) for s in SPLITS], cap)
        except DataError as err:
            bad.report("inconsistent_user", err)
            continue
        if textless.intersection(sequence):
            bad.count("user_with_textless_item", f"user {user_keys[user]!r}")
            continue
        kept_users.append(user_keys[user])
        sequences.append(np.asarray(sequence, dtype=np.int64) + 1)

    # Skipping text-less items leaves holes in item2index order: close them up.
    kept_items = [i for i in range(len(item_keys)) if i not in textless]
    if textless:
        remap = np.zeros(len(item_keys) + 1, dtype=np.int64)
        remap[np.asarray(kept_items, dtype=np.int64) + 1] = np.arange(1, len(kept_items) + 1)
        sequences = [remap[s] for s in sequences]
    return DomainSequences(
        name=source.name,
        item_keys=[item_keys[i] for i in kept_items],
        item_texts=[texts[item_keys[i]] for i in kept_items],
        user_keys=kept_users,
        sequences=sequences,
        skipped=bad.log_summary(),
    )


def read_index(path: Path) -> tuple[list[str], list[int]]:
    """Keys of a ``KEY<TAB>INDEX`` file ordered by index, and the line each is on.

    The indexes must be 0..N-1, each once.
    """
    keys: dict[int, tuple[str, int]] = {}
    for line, text in text_lines(require_file(path)):
        if not text.strip():
            continue
        key, sep, index = text.partition("\t")
        if not sep or not key or not index.strip().isdigit():
            raise DataError("expected KEY<TAB>INDEX", path, line)
        if int(index) in keys:
            raise DataError(f"index {index} given twice", path, line, "index")
        keys[int(index)] = (key, line)
    if not keys:
        raise DataError("empty index file", path, 1)
    if sorted(keys) != list(range(len(keys))):
        gap = min(set(range(len(keys))) - keys.keys())
        raise DataError(
            f"indexes must be 0..{len(keys) - 1}; {gap} is missing", path, field="index"
        )
    ordered = [keys[i] for i in range(len(keys))]
    return [key for key, _ in ordered], [line for _, line in ordered]


def _read_texts(path: Path, bad: BadRows) -> dict[str, str]:
    texts: dict[str, str] = {}
    for line, row in atomic_rows(require_file(path), required=("item_id", "text")):
        item, text = row["item_id"].strip(), clean_text(row["text"])
        if not text:
            bad.report("empty_text", DataError("empty text", path, line, "text"))
        elif item in texts:
            bad.count("duplicate_item", f"{path}:{line}: item {item!r} again; first kept")
        else:
            texts[item] = text
    return texts


def _read_inter(path: Path, num_users: int, num_items: int) -> dict[int, list[InterRow]]:
    """Rows of one inter file grouped by user index, each user's rows in file order."""
    by_user: dict[int, list[InterRow]] = {}
    for line, row in atomic_rows(require_file(path), required=INTER_FIELDS):
        user = _index(row["user_id"], num_users, path, line, "user_id")
        history = tuple(
            _index(v, num_items, path, line, "item_id_list") for v in row["item_id_list"].split()
        )
        target = _index(row["item_id"], num_items, path, line, "item_id")
        if not history:
            raise DataError("empty history", path, line, "item_id_list")
        by_user.setdefault(user, []).append(InterRow(path, line, history, target))
    return by_user


def _index(value: str, size: int, path: Path, line: int, field: str) -> int:
    if not value.strip().isdigit() or int(value) >= size:
        raise DataError(f"{value!r} is not an index below {size}", path, line, field)
    return int(value)


def _rebuild(user: str, split_rows: list[list[InterRow]], cap: int) -> list[int]:
    """User ``user``'s whole sequence of 0-based item indexes, checked against every row."""
    train, valid, test = split_rows
    for rows, name in ((valid, "valid"), (test, "test")):
        if len(rows) != 1:
            where = (train or valid or test)[0]
            raise DataError(
                f"user {user!r} has {len(rows)} {name} rows, expected 1",
                where.file,
                where.line,
                "user_id",
            )
    # The released files list a user's train rows longest history first; either direction
    # is accepted, and the check below catches any other order.
    if train and len(train[0].history) > len(train[-1].history):
        train = train[::-1]
    prefix = [train[0].history[0], *(r.target for r in train)] if train else list(valid[0].history)
    sequence = [*prefix, valid[0].target, test[0].target]

    first_target = len(sequence) - len(train) - 2
    positions = zip([*train, valid[0], test[0]], range(first_target, len(sequence)), strict=True)
    for row, position in positions:
        expected = sequence[max(0, position - cap) : position]
        if list(row.history) != expected or row.target != sequence[position]:
            raise DataError(
                f"row does not fit user {user!r}'s sequence rebuilt from the train rows "
                f"(expected history ending {expected[-3:]} -> {sequence[position]}, "
                f"got ending {list(row.history[-3:])} -> {row.target})",
                row.file,
                row.line,
                "item_id_list",
            )
    return sequence
