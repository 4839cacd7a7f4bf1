"""From an event log to per-user item sequences: cleaning, filtering, ordering, indexing.

The steps of :func:`build_sequences`, in order:

1. drop exact duplicate rows, equal in ``log.duplicate_key`` (by default ``(user, item,
   timestamp)``; counted in ``skipped``);
2. drop interactions on items without usable text (counted);
3. iterative k-core on users and items, with users needing at least 3 interactions
   whatever ``k`` is, because leave-one-out takes a train, a valid and a test item;
4. order each user's interactions by timestamp. A *tie group* (>= 2 interactions of one user
   with one timestamp) is ordered as ``tie_order`` says: ``file`` keeps file order,
   ``shuffle`` sorts by a seeded hash of ``(seed, user, timestamp, item)``, a permutation
   that is the same on every run and does not depend on where the rows sit in the file;
5. index items ``1..N`` in sorted order of their keys, users in sorted order of theirs.
   Sorted keys make the indexes depend only on which items survive, not on row order.

Sequences are kept whole; histories are cut to ``max_seq_len`` only when splits are written
(:func:`leave_one_out`).
"""

from __future__ import annotations

import hashlib
import html
import logging
import re

import numpy as np
import pandas as pd

from sharding.config import ProcessingConfig
from sharding.types import DomainSequences, EventLog
from unisrec.errors import DataError

logger = logging.getLogger(__name__)

# A tag starts with a letter, '/' or '!' right after '<', so "a < b" is kept as text.
_TAG = re.compile(r"<[A-Za-z/!][^<>]*>")
# Tags that break a line separate words ("one<br>two"); inline ones do not ("<b>x</b>.").
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|td|th|table|h[1-6])\b[^<>]*>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")

MIN_USER_INTERACTIONS = 3  # leave-one-out needs a train, a valid and a test item


def clean_text(text: str, max_chars: int | None = None) -> str:
    """Item text as the encoder sees it.

    Unescapes HTML entities, removes HTML tags, collapses whitespace runs to one space and
    strips the ends. With ``max_chars``, longer text is cut at the last word boundary within
    ``max_chars`` characters (mid-word only when the first word alone is longer).
    """
    text = _TAG.sub("", _BLOCK_TAG.sub(" ", html.unescape(text)))
    text = _SPACE.sub(" ", text).strip()
    if max_chars is None or len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    boundary = cut.rfind(" ")
    return (cut[:boundary] if boundary > 0 else cut[:max_chars]).rstrip()


def kcore_filter(events: pd.DataFrame, k: int, user_k: int | None = None) -> pd.DataFrame:
    """Keep the largest sub-log where every item has ``>= k`` and every user ``>= user_k`` rows.

    ``user_k`` defaults to ``k``. Users and items are filtered in turn until nothing changes:
    dropping a user can push an item below ``k``, which can push another user below.
    ``events`` needs columns ``user`` and ``item``; the other columns are carried along.
    """
    user_k = k if user_k is None else user_k
    while True:
        user_counts = events["user"].map(events["user"].value_counts())
        item_counts = events["item"].map(events["item"].value_counts())
        keep = (user_counts >= user_k) & (item_counts >= k)
        if keep.all():
            return events
        events = events[keep]


def build_sequences(
    log: EventLog, cfg: ProcessingConfig, kcore: int | None = None, tie_order: str | None = None
) -> DomainSequences:
    """Turn an event log into chronological, locally indexed item sequences.

    ``kcore`` overrides ``cfg.kcore`` (0 turns k-core off); ``tie_order`` overrides
    ``cfg.tie_order`` (both None: ``file``). Texts are cleaned and cut to
    ``cfg.max_text_chars``. Counts of dropped duplicate rows and of interactions on items
    without text are added to ``skipped`` (keys ``duplicate`` and ``item_without_text``);
    the tie policy and tie-group counts of what is kept go to ``ties``.
    """
    k = cfg.kcore if kcore is None else kcore
    tie_order = tie_order or cfg.tie_order or "file"
    if tie_order not in ("file", "shuffle"):
        raise ValueError(f"tie_order must be 'file' or 'shuffle', got {tie_order!r}")
    skipped = dict(log.skipped)
    events = log.events

    unique = ~events.duplicated(subset=list(log.duplicate_key), keep="first")
    _count(skipped, log.domain, "duplicate", int((~unique).sum()))
    events = events[unique]

    texts, truncated = {}, 0
    for item in events["item"].unique():
        if item in log.item_text and (cleaned := clean_text(log.item_text[item])):
            if len(cleaned) > cfg.max_text_chars:
                truncated += 1
                cleaned = clean_text(log.item_text[item], cfg.max_text_chars)
            texts[item] = cleaned
    if truncated:
        skipped["text_truncated"] = skipped.get("text_truncated", 0) + truncated
        logger.info(
            "%s: cut %d item texts to %d characters", log.domain, truncated, cfg.max_text_chars
        )
    has_text = events["item"].isin(texts.keys())
    _count(skipped, log.domain, "item_without_text", int((~has_text).sum()))
    events = events[has_text]

    before = len(events)
    events = kcore_filter(events, k, user_k=max(k, MIN_USER_INTERACTIONS))
    if events.empty:
        dropped = ", ".join(
            f"{reason} {n}" for reason, n in sorted(skipped.items()) if reason != "text_truncated"
        )
        raise DataError(
            f"domain {log.domain!r}: no interactions left to train on: "
            f"{len(log.events)} interactions read"
            f"{f' (skipped or dropped by reason: {dropped})' if dropped else ''}; "
            f"{before} had an item with text; after {k}-core with >= "
            f"{max(k, MIN_USER_INTERACTIONS)} items per user: 0 users, 0 items, 0 interactions"
        )
    logger.info(
        "%s: %d-core and >=%d items per user dropped %d of %d interactions",
        log.domain,
        k,
        MIN_USER_INTERACTIONS,
        before - len(events),
        before,
    )

    item_keys = sorted(events["item"].unique())
    user_keys = sorted(events["user"].unique())
    item_index = pd.Index(item_keys).get_indexer(events["item"]).astype(np.int64) + 1
    user_index = pd.Index(user_keys).get_indexer(events["user"])
    tied = events.duplicated(subset=["user", "timestamp"], keep=False).to_numpy()
    ties = {
        "order": tie_order,
        "seed": cfg.seed if tie_order == "shuffle" else None,
        "groups": int(tied.sum() - events.duplicated(subset=["user", "timestamp"]).sum()),
        "interactions": int(tied.sum()),
    }
    tie_rank = (
        tie_shuffle_keys(events, tied, cfg.seed)
        if tie_order == "shuffle"
        else np.zeros(len(events), dtype=np.uint64)
    )
    # Last key sorts first: by user, then time, then the tie rank, then file order.
    rows = np.lexsort(
        (events["order"].to_numpy(), tie_rank, events["timestamp"].to_numpy(), user_index)
    )
    ends = np.cumsum(np.bincount(user_index, minlength=len(user_keys)))
    sequences = np.split(item_index[rows], ends[:-1]) if user_keys else []

    return DomainSequences(
        name=log.domain,
        item_keys=item_keys,
        item_texts=[texts[item] for item in item_keys],
        user_keys=user_keys,
        sequences=sequences,
        skipped=skipped,
        ties=ties,
    )


def tie_shuffle_keys(events: pd.DataFrame, tied: np.ndarray, seed: int) -> np.ndarray:
    """``(len(events),) uint64`` sort keys that shuffle each tie group, seeded.

    A tied row's key is a hash of ``(seed, user, timestamp, item)``, so a group's permutation
    depends on the seed and on the group's own rows only: not on their positions in the file
    nor on any other row. Rows with the same item in one group get equal keys (and stay in
    file order, which changes nothing in the sequence). Untied rows (``tied`` False) get 0.
    """
    keys = np.zeros(len(events), dtype=np.uint64)
    where = np.flatnonzero(tied)
    columns = (events[c].to_numpy()[where] for c in ("user", "timestamp", "item"))
    for row, (user, timestamp, item) in zip(where, zip(*columns, strict=True), strict=True):
        text = f"{seed}\x1f{user}\x1f{float(timestamp)!r}\x1f{item}"
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        keys[row] = int.from_bytes(digest, "little")
    return keys


def leave_one_out(
    sequence: np.ndarray, max_seq_len: int
) -> tuple[np.ndarray, tuple[np.ndarray, int], tuple[np.ndarray, int]]:
    """Split one user's whole sequence ``(L,) int64`` into train, valid and test.

    Returns ``train_seq = sequence[:-2]`` (whole), ``(valid_history, valid_target)`` with
    the item ``sequence[-2]`` and ``(test_history, test_target)`` with ``sequence[-1]``;
    each history is the last ``max_seq_len`` items before its target.

    ``[1, 2, 3, 4, 5]`` with ``max_seq_len=2`` -> ``[1, 2, 3]``, ``([2, 3], 4)``, ``([3, 4], 5)``.
    """
    if len(sequence) < MIN_USER_INTERACTIONS:
        raise ValueError(
            f"leave-one-out needs at least {MIN_USER_INTERACTIONS} items, got {len(sequence)}"
        )
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    train = sequence[:-2]
    valid = (train[-max_seq_len:], int(sequence[-2]))
    test = (sequence[:-1][-max_seq_len:], int(sequence[-1]))
    return train, valid, test


def _count(skipped: dict[str, int], domain: str, reason: str, count: int) -> None:
    if count:
        skipped[reason] = skipped.get(reason, 0) + count
        logger.warning("%s: dropped %d rows (%s)", domain, count, reason)
