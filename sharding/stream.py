"""Stream pretraining shards as padded batches, the same number on every rank.

Shards are assigned by position after a per-epoch seeded permutation: shard ``j`` of the
permuted list goes to rank ``j % world_size``; a rank's shards are then split across its
loader workers the same way. Each sequence is therefore read exactly once per epoch across
all ranks and workers. Since shard sizes are known from the manifest, every rank computes
the same ``batches_in_epoch`` and pads its stream with *filler* batches (all rows
``lengths == 0``) so no rank leaves a collective early. With ``bucket_batches`` the shuffled samples are
grouped into batches of similar length (far less padding), with the same batch count.

A batch is a dict of tensors, always ``batch_size`` rows (rows past the real samples are
filler)::

    items      (B, T) int64   global item indexes, right-padded with 0, T = longest row
    lengths    (B,)   int64   items per row; 0 = filler row
    first_query (B,)  int64   input positions >= this are queries (0 for filler)
    sample_id  (B,)   int64   stable id of the sample (-1 for filler)
    domain_id  (B,)   int64   domain of the sample (-1 for filler)
    user       (B,)   int64   the sample's user, unique across domains: domain_id * 2**32 +
                              the domain's user index (-1 for filler); the losses mask by it
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import webdataset as wds

from unisrec.errors import DataError


@dataclass(frozen=True)
class ShardSpec:
    url: str  # local path, http(s) URL or "pipe:CMD"
    num_samples: int  # samples read from it (of `domains` only, when set)
    domains: tuple[str, ...] = ()  # read only these domains' samples; () = all


def pad_batch(rows: list[dict], batch_size: int) -> dict[str, torch.Tensor]:
    """Collate decoded samples into a fixed-size padded batch (see module docstring).

    An all-filler batch is 2 columns wide (one input, one target, both padding): the loss
    still runs its collectives on it, with nothing to score.
    """
    width = max((len(r["items"]) for r in rows), default=2)
    items = torch.zeros(batch_size, width, dtype=torch.long)
    lengths = torch.zeros(batch_size, dtype=torch.long)
    first_query = torch.zeros(batch_size, dtype=torch.long)
    sample_id = torch.full((batch_size,), -1, dtype=torch.long)
    domain_id = torch.full((batch_size,), -1, dtype=torch.long)
    user = torch.full((batch_size,), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        seq = row["items"]
        items[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        lengths[i] = len(seq)
        first_query[i] = row["first_query"]
        sample_id[i] = row["sample_id"]
        domain_id[i] = row["domain_id"]
        user[i] = user_key(row["domain_id"], row["user"])
    return {
        "items": items,
        "lengths": lengths,
        "first_query": first_query,
        "sample_id": sample_id,
        "domain_id": domain_id,
        "user": user,
    }


def user_key(domain_id: int, user: int) -> int:
    """One int64 per (domain, user index): users of different domains never collide."""
    return domain_id * 2**32 + user


def length_bucketed(
    samples: Iterator[dict], batch_size: int, bucket_batches: int, rng: random.Random
) -> Iterator[list[dict]]:
    """Cut a (shuffled) stream of samples into batches of rows of similar length.

    Every ``bucket_batches x batch_size`` samples are sorted by length (ties keep the
    stream's random order), cut into ``bucket_batches`` full batches, and those batches are
    yielded in a random order. A batch is padded to its longest row, so mixing a 51-item
    window into a batch of 9-item ones multiplies the encoder's work; sorted batches pad
    little. Every sample is yielded once, and ``n`` samples give ``ceil(n / batch_size)``
    batches, as plain batching does (only the last batch can be short).
    ``bucket_batches <= 1`` is plain batching in stream order.
    """
    chunk = batch_size * max(bucket_batches, 1)
    rows: list[dict] = []
    for sample in samples:
        rows.append(sample)
        if len(rows) == chunk:
            yield from _sorted_batches(rows, batch_size, bucket_batches, rng)
            rows = []
    if rows:
        yield from _sorted_batches(rows, batch_size, bucket_batches, rng)


def _sorted_batches(
    rows: list[dict], batch_size: int, bucket_batches: int, rng: random.Random
) -> list[list[dict]]:
    if bucket_batches > 1:
        rows = sorted(rows, key=lambda r: len(r["items"]))
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if bucket_batches > 1:
        rng.shuffle(batches)
    return batches


class _RankShards(torch.utils.data.IterableDataset):
    """One rank's shards for one epoch; loader worker ``w`` reads ``per_worker[w]``."""

    def __init__(
        self,
        per_worker: list[list[ShardSpec]],
        batch_size: int,
        shuffle_buffer: int,
        seed: int,
        bucket_batches: int = 0,
    ):
        self.per_worker = per_worker
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.bucket_batches = bucket_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rng = random.Random(self.seed * 1000 + worker)
        samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(
            _read_shards(self.per_worker[worker])
        )
        for rows in length_bucketed(samples, self.batch_size, self.bucket_batches, rng):
            yield pad_batch(rows, self.batch_size)


_REQUIRED_FIELDS = ("items", "first_query", "sample_id", "domain_id", "user")


def _read_shards(shards: list[ShardSpec]) -> Iterator[dict]:
    """Decoded samples of ``shards`` in order; a short or unreadable shard is a DataError."""
    for spec in shards:
        count = 0
        try:
            for raw in wds.tarfile_to_samples()(iter([{"url": spec.url}])):
                sample = json.loads(raw["json"])
                if spec.domains and sample["domain"] not in spec.domains:
                    continue
                count += 1
                for field in _REQUIRED_FIELDS:
                    if field not in sample:
                        raise DataError(
                            f"sample {raw['__key__']!r} has no {field} (a version 1 shard?)",
                            file=spec.url,
                            field=field,
                        )
                yield sample
        except DataError:
            raise
        except Exception as err:  # tarfile and IO errors do not name the shard
            raise DataError(f"cannot read shard: {err}", file=spec.url) from err
        if count != spec.num_samples:
            raise DataError(
                f"shard holds {count} samples, the manifest says {spec.num_samples} "
                "(truncated or replaced shard)",
                file=spec.url,
            )


class ShardStream:
    """Per-rank reader of pretraining shards.

    Args:
        shards: every shard of the data set with its sample count (from the manifest).
        batch_size: rows per batch on this rank.
        rank, world_size: this rank's place among the data-parallel workers.
        num_workers: DataLoader worker processes on this rank (0 = read in-process).
        seed: shard order and shuffle buffer are seeded by ``(seed, epoch)``.
        shuffle_buffer: samples held for shuffling within a rank's stream.
        bucket_batches: after the shuffle, every this many batches' samples are sorted into
            batches of similar length, yielded in random order (see :func:`length_bucketed`;
            0 or 1 = off).
    """

    def __init__(
        self,
        shards: list[ShardSpec],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        bucket_batches: int = 0,
    ):
        if not shards:
            raise ValueError("no shards to stream")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.bucket_batches = bucket_batches

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def assignment(self, epoch: int) -> list[list[list[ShardSpec]]]:
        """``[rank][worker] -> shards`` for ``epoch``; identical on every rank."""
        order = list(range(len(self.shards)))
        random.Random(self.seed * 7919 + epoch).shuffle(order)
        per_rank = [
            [self.shards[j] for j in order[r :: self.world_size]] for r in range(self.world_size)
        ]
        workers = max(self.num_workers, 1)
        return [[shards[w::workers] for w in range(workers)] for shards in per_rank]

    def batches_in_epoch(self, epoch: int) -> int:
        """Batches every rank yields in ``epoch`` (the largest rank's count)."""
        return max(self._real_batches(worker_lists) for worker_lists in self.assignment(epoch))

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield exactly ``batches_in_epoch(epoch)`` batches: this rank's data, then fillers."""
        assignment = self.assignment(epoch)
        total = max(self._real_batches(w) for w in assignment)
        dataset = _RankShards(
            assignment[self.rank],
            self.batch_size,
            self.shuffle_buffer,
            seed=self.seed * 1_000_003 + epoch * 1009 + self.rank,
            bucket_batches=self.bucket_batches,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            # Its own generator: creating a loader iterator must not advance the global torch
            # RNG, or a run resumed mid-epoch would draw different dropout than the original.
            generator=torch.Generator().manual_seed(self.seed),
        )
        emitted = 0
        for batch in loader:
            emitted += 1
            yield batch
        for _ in range(total - emitted):
            yield pad_batch([], self.batch_size)

    def _real_batches(self, worker_lists: list[list[ShardSpec]]) -> int:
        return sum(
            math.ceil(sum(s.num_samples for s in shards) / self.batch_size)
            for shards in worker_lists
        )
