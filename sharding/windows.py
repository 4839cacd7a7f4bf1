"""Training windows: how a user's sequence is cut into model-sized pieces.

Pretraining (``sharding/pretrain_shards.py``) and fine-tuning (``adaptors/finetune.py``) cut
sequences the same way, so both read this one definition.

The rule (the official UniSRec code's): every target ``t >= 1`` of a sequence ``s`` is a
training query exactly once, and its history is exactly ``s[max(0, t - L):t]``, the last
``L = max_seq_len`` items before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class TrainingWindow(NamedTuple):
    """A piece of a sequence and which of its input positions are queries.

    items: ``(n,)`` with ``2 <= n <= max_seq_len + 1``; input position ``j`` (``0..n-2``)
    predicts ``items[j + 1]`` from ``items[:j + 1]``. Positions ``j >= first_query`` are
    queries; earlier ones are history only (their target was queried in an earlier window).
    """

    items: np.ndarray
    first_query: int


def training_windows(
    sequence: np.ndarray, max_seq_len: int, stride: int = 1
) -> Iterator[TrainingWindow]:
    """The fewest windows that make every target a query once with its full history.

    ``[1..7]`` with ``max_seq_len=3``::

        [1 2 3 4]  first_query 0   targets 2, 3, 4 (histories [1], [1 2], [1 2 3])
        [2 3 4 5]  first_query 2   target 5 (history [2 3 4])
        [3 4 5 6]  first_query 2   target 6
        [4 5 6 7]  first_query 2   target 7

    Why one window per late target: the encoder is causal with learned positions, so a
    target's history must start at the window's position 0. Target ``t <= L`` has history
    ``s[0:t]``: the first window serves them all. Target ``t > L`` needs a window starting at
    ``t - L``, which holds ``L + 1`` items and so ends at ``t``; every other target inside it
    would see fewer than ``L`` items, so it is a query only for ``t``. A sequence of ``n``
    items gives ``1 + max(0, n - 1 - L)`` windows; a target past the first window costs
    ``L`` encoded positions instead of one (what the official code pays too: it makes every
    prefix->next pair a sample of its own).

    ``stride`` S > 1 trades history for work on long sequences: each later window ends S
    targets after the previous one and queries its last S targets, so such a target sees
    between ``L - S + 1`` and ``L`` items and costs ``(L + 1) / S`` positions. With
    ``max_seq_len=3, stride=2`` the example above becomes ``[1 2 3 4]`` (first_query 0),
    ``[3 4 5 6]`` (first_query 1: targets 5, 6), ``[4 5 6 7]`` (first_query 2: target 7).
    Every target is still a query exactly once; ``stride=1`` is the rule above.
    """
    n = len(sequence)
    if n < 2:
        return
    if not 1 <= stride <= max_seq_len:
        raise ValueError(f"stride must be in 1..max_seq_len ({max_seq_len}), got {stride}")
    yield TrainingWindow(sequence[: max_seq_len + 1], 0)
    last = max_seq_len  # the last target queried so far
    while last + 1 < n:
        end = min(last + stride, n - 1)
        yield TrainingWindow(sequence[end - max_seq_len : end + 1], max_seq_len - (end - last))
        last = end
