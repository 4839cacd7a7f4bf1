"""What adapters hand to processing, and what processing hands to the writer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class EventLog:
    """Timestamped interactions of one domain, as read from raw files.

    events: columns ``user`` (str), ``item`` (str), ``timestamp`` (float64, unix seconds),
    ``order`` (int64, position in the source file: ``tie_order: file`` orders equal
    timestamps by it), plus any further columns named in ``duplicate_key``.
    item_text: item key -> raw text, for every item that has text.
    skipped: counts of rows skipped (``on_bad_row: skip``) by reason.
    duplicate_key: rows equal in these columns are one interaction; the format decides
    (online-retail adds ``quantity``, as the paper did).
    """

    domain: str
    events: pd.DataFrame
    item_text: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)
    duplicate_key: tuple[str, ...] = ("user", "item", "timestamp")


@dataclass
class DomainSequences:
    """One domain, processed: a chronological item sequence per user.

    Item local index ``i`` (1-based; 0 is padding) has key ``item_keys[i-1]`` and text
    ``item_texts[i-1]``. ``sequences[u]`` is user ``user_keys[u]``'s whole history as int64
    local indexes, oldest first; leave-one-out takes ``[:-2]`` for training, ``[-2]`` as the
    valid target and ``[-1]`` as the test target.

    ties: how equal timestamps were ordered and how much that mattered, after filtering:
    ``order`` (``file``/``shuffle``), ``seed`` (``shuffle`` only, else None), ``groups``
    (groups of >= 2 interactions of one user with one timestamp) and ``interactions`` (in
    such groups). None where the source has no timestamps (unisrec-atomic).
    """

    name: str
    item_keys: list[str]
    item_texts: list[str]
    user_keys: list[str]
    sequences: list[np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)
    ties: dict | None = None

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))
