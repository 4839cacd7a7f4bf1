"""What adapters hand to processing, and what processing hands to the writer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class EventLog:
    """Timestamped interactions of one domain, as read from raw files.

    events: columns ``user`` (str), ``item`` (str), ``timestamp`` (float64, unix seconds),
    ``order`` (int64, position in the source file: ties in timestamp keep file order).
    item_text: item key -> raw text, for every item that has text.
    skipped: counts of rows skipped (``on_bad_row: skip``) by reason.
    """

    domain: str
    events: pd.DataFrame
    item_text: dict[str, str]
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class DomainSequences:
    """One domain, processed: a chronological item sequence per user.

    Item local index ``i`` (1-based; 0 is padding) has key ``item_keys[i-1]`` and text
    ``item_texts[i-1]``. ``sequences[u]`` is user ``user_keys[u]``'s whole history as int64
    local indexes, oldest first; leave-one-out takes ``[:-2]`` for training, ``[-2]`` as the
    valid target and ``[-1]`` as the test target.
    """

    name: str
    item_keys: list[str]
    item_texts: list[str]
    user_keys: list[str]
    sequences: list[np.ndarray]
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))
