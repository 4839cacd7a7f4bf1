"""Streaming pretraining shards: exactly once per epoch, equal batch counts, bad shards named."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from sharding.pretrain_shards import pretraining_samples, write_shards
from sharding.stream import ShardSpec, ShardStream
from unisrec.errors import DataError


def _write(tmp_path, num_users=(37, 23), num_shards=6, max_seq_len=5):
    rng = np.random.default_rng(0)
    domains = []
    offset = 0
    for domain_id, n in enumerate(num_users):
        seqs = [rng.integers(1, 30, size=rng.integers(2, 14)) for _ in range(n)]
        domains.append((f"d{domain_id}", domain_id, offset, seqs))
        offset += 30
    samples = pretraining_samples(domains, max_seq_len)
    records = write_shards(samples, tmp_path, num_shards=num_shards, seed=1)
    specs = [ShardSpec(str(tmp_path / r["name"]), r["num_samples"]) for r in records]
    return samples, specs


def _read(specs, rank, world, workers, epoch, batch_size=4, seed=0, bucket_batches=0):
    stream = ShardStream(
        specs, batch_size, rank=rank, world_size=world, num_workers=workers, seed=seed,
        bucket_batches=bucket_batches,
    )  # fmt: skip
    batches = list(stream.epoch(epoch))
    return stream, batches


@pytest.mark.parametrize("bucket_batches", [0, 3], ids=["plain", "length-buckets"])
@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_sequence_exactly_once_with_equal_batch_counts(
    tmp_path, workers, bucket_batches
):
    samples, specs = _write(tmp_path)
    for epoch in (0, 1):
        seen = Counter()
        counts = []
        for rank in range(2):
            stream, batches = _read(specs, rank, 2, workers, epoch, bucket_batches=bucket_batches)
            counts.append(len(batches))
            assert len(batches) == stream.batches_in_epoch(epoch)
            for batch in batches:
                real = batch["lengths"] > 0
                seen.update(batch["sample_id"][real].tolist())
        assert counts[0] == counts[1]
        assert sorted(seen) == list(range(len(samples)))
        assert set(seen.values()) == {1}


def test_batches_are_padded_to_fixed_rows_and_hold_the_written_items(tmp_path):
    samples, specs = _write(tmp_path)
    by_id = {s.sample_id: s for s in samples}
    _, batches = _read(specs, 0, 1, 0, epoch=0, batch_size=8)
    for batch in batches:
        assert batch["items"].shape[0] == 8
        for row in range(8):
            n = int(batch["lengths"][row])
            if n == 0:
                assert batch["sample_id"][row] == batch["user"][row] == -1
                continue
            sample = by_id[int(batch["sample_id"][row])]
            assert batch["items"][row, :n].tolist() == sample.items
            assert batch["first_query"][row] == sample.first_query
            assert batch["user"][row] == sample.domain_id * 2**32 + sample.user
            assert torch.all(batch["items"][row, n:] == 0)


def test_domains_interleave_within_shards(tmp_path):
    _, specs = _write(tmp_path, num_shards=3)
    _, batches = _read(specs, 0, 1, 0, epoch=0, batch_size=1000)
    domains = batches[0]["domain_id"][batches[0]["lengths"] > 0]
    assert set(domains.tolist()) == {0, 1}


def test_seeded_shuffle_is_reproducible_and_changes_with_epoch(tmp_path):
    _, specs = _write(tmp_path)

    def order(epoch):
        return torch.cat([b["sample_id"] for b in _read(specs, 0, 1, 0, epoch)[1]]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_more_readers_than_shards_still_yields_equal_counts(tmp_path):
    samples, specs = _write(tmp_path, num_shards=2)
    seen = []
    counts = []
    for rank in range(2):
        _, batches = _read(specs, rank, 2, 2, epoch=0)
        counts.append(len(batches))
        seen += [int(i) for b in batches for i in b["sample_id"] if i >= 0]
    assert counts[0] == counts[1]
    assert sorted(seen) == list(range(len(samples)))


def test_truncated_shard_is_an_error_naming_it(tmp_path):
    _, specs = _write(tmp_path)
    victim = specs[0].url
    data = open(victim, "rb").read()
    with open(victim, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(DataError, match="pretrain-000000.tar"):
        for rank in range(2):
            _read(specs, rank, 2, 0, epoch=0)


def test_shard_with_fewer_samples_than_the_manifest_is_an_error(tmp_path):
    _, specs = _write(tmp_path)
    wrong = [ShardSpec(specs[0].url, specs[0].num_samples + 1)] + specs[1:]
    with pytest.raises(DataError, match="manifest says"):
        for rank in range(1):
            _read(wrong, rank, 1, 0, epoch=0)


def test_version_1_sample_without_first_query_is_an_error_naming_shard_and_field(tmp_path):
    import webdataset as wds

    path = tmp_path / "pretrain-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "a-0-0", "json": {"items": [1, 2], "sample_id": 0, "domain_id": 0}})
    with pytest.raises(DataError, match=r"pretrain-000000.tar: field 'first_query'"):
        list(ShardStream([ShardSpec(str(path), 1)], 4).epoch(0))


def test_a_rank_without_shards_yields_filler_batches_the_loss_can_slice(tmp_path):
    """One held-out shard, two ranks: rank 1 reads only filler batches. They must still have
    an input and a target column (a width-1 filler made next_item_targets raise)."""
    from pretrain.losses import next_item_targets

    samples = pretraining_samples([("a", 0, 0, [np.arange(1, 5)] * 3)], 50)
    records = write_shards(samples, tmp_path, num_shards=1, seed=0)
    specs = [ShardSpec(str(tmp_path / r["name"]), r["num_samples"]) for r in records]
    assert ShardStream(specs, batch_size=2, rank=0, world_size=2).assignment(0)[1] == [[]]
    batches = list(ShardStream(specs, batch_size=2, rank=1, world_size=2).epoch(0))
    assert len(batches) == 2 and all((b["lengths"] == 0).all() for b in batches)
    for batch in batches:
        _, inputs, targets, query_mask = next_item_targets(batch)
        assert inputs.shape[1] == targets.shape[1] >= 1 and not query_mask.any()


def _padded_cells(batches) -> int:
    return sum(int(b["items"].shape[1] * (b["lengths"] > 0).sum()) for b in batches)


def test_length_buckets_cut_padding_and_repeat_exactly_for_a_seed(tmp_path):
    """Bucketed batches hold rows of similar length (less padding than shuffled ones); the
    same seed and epoch give the same batches, which is what an exact resume replays."""
    samples, specs = _write(tmp_path, num_users=(120, 80), max_seq_len=12)
    real = sum(len(s.items) for s in samples)
    _, plain = _read(specs, 0, 1, 0, epoch=0, batch_size=8)
    _, bucketed = _read(specs, 0, 1, 0, epoch=0, batch_size=8, bucket_batches=4)
    assert len(bucketed) == len(plain)
    assert _padded_cells(bucketed) - real < 0.5 * (_padded_cells(plain) - real)
    _, again = _read(specs, 0, 1, 0, epoch=0, batch_size=8, bucket_batches=4)
    for a, b in zip(bucketed, again, strict=True):
        assert torch.equal(a["sample_id"], b["sample_id"])
    # Batch order is shuffled: lengths do not simply rise through the epoch.
    widths = [b["items"].shape[1] for b in bucketed]
    assert widths != sorted(widths)
