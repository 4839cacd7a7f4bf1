"""Training windows: how a user's sequence is cut into model-sized pieces.

Pretraining (``sharding/pretrain_shards.py``) and fine-tuning (``adaptors/finetune.py``) cut
sequences the same way, so both read this one definition.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def training_windows(sequence: np.ndarray, max_seq_len: int) -> Iterator[np.ndarray]:
    """Windows of at most ``max_seq_len + 1`` items covering every transition once.

    ``[1..7]`` with ``max_seq_len=3`` -> ``[1,2,3,4]``, ``[4,5,6,7]``.
    """
    step = max_seq_len
    for start in range(0, max(len(sequence) - 1, 0), step):
        window = sequence[start : start + max_seq_len + 1]
        if len(window) >= 2:
            yield window
