"""Pretraining windows and shard writing."""

from __future__ import annotations

import numpy as np

from sharding.pretrain_shards import pretraining_samples, write_shards
from sharding.windows import training_windows


def test_windows_cover_every_transition_once_with_histories_capped():
    seq = np.arange(1, 8)
    windows = [w.tolist() for w in training_windows(seq, max_seq_len=3)]
    assert windows == [[1, 2, 3, 4], [4, 5, 6, 7]]
    transitions = [(w[i], w[i + 1]) for w in windows for i in range(len(w) - 1)]
    assert transitions == [(i, i + 1) for i in range(1, 7)]


def test_short_sequences_give_one_window_and_single_items_none():
    assert [w.tolist() for w in training_windows(np.array([5, 6]), 50)] == [[5, 6]]
    assert list(training_windows(np.array([5]), 50)) == []


def test_samples_use_global_indexes():
    samples = pretraining_samples(
        [("a", 0, 0, [np.array([1, 2])]), ("b", 1, 10, [np.array([1, 3])])], 50
    )
    assert [(s.domain, s.items) for s in samples] == [("a", [1, 2]), ("b", [11, 13])]
    assert [s.sample_id for s in samples] == [0, 1]


def test_shards_are_balanced_and_byte_identical_for_the_same_seed(tmp_path):
    samples = pretraining_samples([("a", 0, 0, [np.arange(1, 5)] * 11)], 50)
    first = write_shards(samples, tmp_path / "one", num_shards=3, seed=4)
    second = write_shards(samples, tmp_path / "two", num_shards=3, seed=4)
    assert [r["num_samples"] for r in first] == [4, 4, 3]
    assert [r["sha256"] for r in first] == [r["sha256"] for r in second]
    assert not list((tmp_path / "one").glob(".*tmp*"))
