"""Pretraining windows and shard writing."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.losses import next_item_targets
from sharding.pretrain_shards import pretraining_samples, write_shards
from sharding.stream import ShardSpec, ShardStream
from sharding.windows import training_windows


def test_windows_make_every_target_a_query_once_with_the_last_max_seq_len_items():
    windows = [(w.items.tolist(), w.first_query) for w in training_windows(np.arange(1, 8), 3)]
    assert windows == [([1, 2, 3, 4], 0), ([2, 3, 4, 5], 2), ([3, 4, 5, 6], 2), ([4, 5, 6, 7], 2)]


def test_strided_windows_query_their_last_stride_targets():
    windows = [(w.items.tolist(), w.first_query) for w in training_windows(np.arange(1, 8), 3, 2)]
    assert windows == [([1, 2, 3, 4], 0), ([3, 4, 5, 6], 1), ([4, 5, 6, 7], 2)]
    with pytest.raises(ValueError, match="stride"):
        list(training_windows(np.arange(1, 8), 3, 4))


@pytest.mark.parametrize(("max_seq_len", "stride"), [(7, 3), (50, 25), (50, 50)])
def test_strided_windows_query_every_target_once_with_at_least_l_minus_s_plus_1_items(
    max_seq_len, stride
):
    """Property: the target at position t is a query once; its history is the items just
    before it, all of them when t <= L, else between L - S + 1 and L of them."""
    rng = np.random.default_rng(stride)
    for n in [2, max_seq_len + 1, max_seq_len + 2, 300, *rng.integers(2, 301, size=20)]:
        seq = np.arange(n) + 1
        seen: dict[int, int] = {}
        for window in training_windows(seq, max_seq_len, stride):
            items = window.items.tolist()
            for j in range(window.first_query, len(items) - 1):
                t = items[j + 1] - 1
                assert t not in seen
                assert items[: j + 1] == seq[t - j - 1 : t].tolist()
                seen[t] = j + 1
        assert sorted(seen) == list(range(1, n))
        for t, history in seen.items():
            low = t if t <= max_seq_len else max_seq_len - stride + 1
            assert low <= history <= min(t, max_seq_len)
        windows = len(list(training_windows(seq, max_seq_len, stride)))
        assert windows == 1 + -(-max(0, n - 1 - max_seq_len) // stride)


def test_short_sequences_give_one_window_and_single_items_none():
    assert [w.items.tolist() for w in training_windows(np.array([5, 6]), 50)] == [[5, 6]]
    assert list(training_windows(np.array([5]), 50)) == []


@pytest.mark.parametrize("max_seq_len", [1, 7, 50])
def test_shard_samples_query_every_target_once_with_exactly_its_history(tmp_path, max_seq_len):
    """Property over random lengths 2..300, read back through shards, stream and loss masks.

    Item ``1000 * user + t + 1`` is user's t-th item, so a query's target names (user, t).
    """
    rng = np.random.default_rng(max_seq_len)
    lengths = [2, 300, max_seq_len + 1, max_seq_len + 2, *rng.integers(2, 301, size=12)]
    sequences = [1000 * u + np.arange(n) + 1 for u, n in enumerate(lengths)]
    samples = pretraining_samples([("d", 0, 0, sequences)], max_seq_len)
    records = write_shards(samples, tmp_path, num_shards=3, seed=0)
    stream = ShardStream(
        [ShardSpec(str(tmp_path / r["name"]), r["num_samples"]) for r in records], 64
    )

    seen: dict[tuple[int, int], list[int]] = {}
    for batch in stream.epoch(0):
        _, inputs, targets, query_mask = next_item_targets(batch)
        for row, j in query_mask.nonzero().tolist():
            user, t = divmod(int(targets[row, j]) - 1, 1000)
            assert (user, t) not in seen, f"target {t} of user {user} queried twice"
            seen[user, t] = inputs[row, : j + 1].tolist()
    for user, seq in enumerate(sequences):
        for t in range(1, len(seq)):
            assert seen.pop((user, t)) == seq[max(0, t - max_seq_len) : t].tolist()
    assert not seen


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


def test_heldout_users_go_to_their_own_shard_and_never_to_training(tmp_path):
    """shards.heldout_fraction: a seeded 25% of each domain's users, all their windows in
    heldout-<domain>.tar, none of them in the training shards; the rest untouched."""
    import json

    import webdataset as wds
    from helpers_data import write_small_dataset

    from sharding.dataset import Dataset

    root = write_small_dataset(
        tmp_path / "data",
        domains=("office", "games", "target"),
        num_users=40,
        pretrain_domains=("office", "games"),
        heldout_fraction=0.25,
    )
    ds = Dataset(root)
    heldout = ds.heldout_specs()
    assert sorted(heldout) == ["games", "office"]

    def users(specs):
        out = set()
        for spec in specs:
            for raw in wds.tarfile_to_samples()(iter([{"url": spec.url}])):
                sample = json.loads(raw["json"])
                out.add((sample["domain"], sample["user"]))
        return out

    training = users(ds.shard_specs())
    for domain, specs in heldout.items():
        held = users(specs)
        assert 0 < len(held) <= 10 and {d for d, _ in held} == {domain}  # 25% of 40 users
        assert not held & training
        # Every user of the domain with a training window is in exactly one of the two.
        train = ds.split(domain, "train")
        everyone = {(domain, int(u)) for u, i in zip(train["user"], train["items"]) if len(i) > 1}
        assert held | {p for p in training if p[0] == domain} == everyone
    again = write_small_dataset(
        tmp_path / "again",
        domains=("office", "games", "target"),
        num_users=40,
        pretrain_domains=("office", "games"),
        heldout_fraction=0.25,
    )
    assert users(Dataset(again).heldout_specs()["games"]) == users(heldout["games"])
