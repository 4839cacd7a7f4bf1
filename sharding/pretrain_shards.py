"""Mixed-domain pretraining shards (webdataset tar files).

A sample is one training window of one user's sequence, in *global* item indexes::

    __key__     "office-00000042-000"        domain, user, window
    json        {"items": [g1, g2, ...], "first_query": 0, "domain": "office",
                 "domain_id": 0, "user": 42, "sample_id": 1234}

A user's training sequence (everything before the valid and test items) is cut by
:func:`sharding.windows.training_windows`: every target is a query in exactly one window
(input positions ``>= first_query``) and sees exactly the ``max_seq_len`` items before it
(at least ``max_seq_len - window_stride + 1`` with ``shards.window_stride``).
The sample format's version is :data:`SAMPLE_VERSION` (``shards.sample_version`` in the
manifest); version 1 samples had no ``first_query`` and are refused.
Samples of all domains are shuffled together (seeded) and dealt round-robin into
``num_shards`` shards: domains interleave across and within shards, and shard sizes differ
by at most one.

With ``heldout_fraction > 0`` a seeded fraction of each domain's users is held out: all
their windows go to ``heldout-<domain>.tar`` (one shard per domain, in sample order) and
none to the training shards, for the held-out pretraining loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

from sharding.atomic import atomic_path, sha256_file
from sharding.windows import training_windows

SHARD_PATTERN = "pretrain-{index:06d}.tar"
SAMPLE_VERSION = 2  # 2: samples carry first_query (1: overlapping windows, every position)
HELDOUT_PATTERN = "heldout-{domain}.tar"


@dataclass(frozen=True)
class PretrainSample:
    key: str
    items: list[int]  # global item indexes, oldest first, 2..max_seq_len+1 of them
    first_query: int  # input positions >= this are queries; earlier ones are history
    domain: str
    domain_id: int
    user: int
    sample_id: int


def pretraining_samples(
    domains: Iterable[tuple[str, int, int, list[np.ndarray]]],
    max_seq_len: int,
    window_stride: int = 1,
) -> list[PretrainSample]:
    """Samples from ``(name, domain_id, global_offset, train_sequences)`` per domain.

    ``train_sequences[u]`` holds user ``u``'s local item indexes (1-based); the global index
    of local item ``i`` is ``global_offset + i``. ``window_stride``: see
    :func:`sharding.windows.training_windows` (1 = every target with its full history).
    """
    samples: list[PretrainSample] = []
    for name, domain_id, offset, sequences in domains:
        for user, sequence in enumerate(sequences):
            for w, window in enumerate(
                training_windows(np.asarray(sequence), max_seq_len, window_stride)
            ):
                samples.append(
                    PretrainSample(
                        key=f"{name}-{user:08d}-{w:03d}",
                        items=[int(i) + offset for i in window.items],
                        first_query=window.first_query,
                        domain=name,
                        domain_id=domain_id,
                        user=user,
                        sample_id=len(samples),
                    )
                )
    return samples


def heldout_users(
    domains: Iterable[tuple[str, int, int, list[np.ndarray]]], fraction: float, seed: int
) -> set[tuple[str, int]]:
    """``(domain, user)`` pairs held out of pretraining: ``round(fraction * users)`` users of
    each domain (at least one when ``fraction > 0``), drawn with ``Random(f"{seed}:{domain}")``
    so the choice depends only on the seed and the domain's own user count."""
    held: set[tuple[str, int]] = set()
    if fraction <= 0:
        return held
    for name, _, _, sequences in domains:
        count = min(len(sequences), max(1, round(fraction * len(sequences))))
        chosen = random.Random(f"{seed}:{name}").sample(range(len(sequences)), count)
        held.update((name, user) for user in chosen)
    return held


def write_heldout_shards(samples: list[PretrainSample], out_dir: Path) -> list[dict]:
    """One shard per domain of ``samples`` (held-out windows), in sample order; records as
    :func:`write_shards` plus ``domain``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, list[PretrainSample]] = {}
    for sample in samples:
        by_domain.setdefault(sample.domain, []).append(sample)
    records = []
    for domain, members in by_domain.items():
        name = HELDOUT_PATTERN.format(domain=domain)
        with atomic_path(out_dir / name) as tmp:
            _write_tar(tmp, members)
        records.append(
            {
                "name": name,
                "domain": domain,
                "num_samples": len(members),
                "sha256": sha256_file(out_dir / name),
                "bytes": (out_dir / name).stat().st_size,
            }
        )
    return records


def write_shards(
    samples: list[PretrainSample], out_dir: Path, num_shards: int, seed: int
) -> list[dict]:
    """Shuffle ``samples`` and write them into ``num_shards`` tar shards under ``out_dir``.

    Each shard is written to a temporary name and renamed when complete, so a reader never
    opens a half-written shard. Returns one record per shard: name, num_samples, sha256,
    bytes and samples per domain.
    """
    if not samples:
        raise ValueError("no pretraining samples: mark at least one domain with 'pretrain: true'")
    num_shards = max(1, min(num_shards, len(samples)))
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(num_shards):
        members = [samples[i] for i in order[index::num_shards]]
        name = SHARD_PATTERN.format(index=index)
        with atomic_path(out_dir / name) as tmp:
            _write_tar(tmp, members)
        per_domain: dict[str, int] = {}
        for sample in members:
            per_domain[sample.domain] = per_domain.get(sample.domain, 0) + 1
        records.append(
            {
                "name": name,
                "num_samples": len(members),
                "sha256": sha256_file(out_dir / name),
                "bytes": (out_dir / name).stat().st_size,
                "domains": per_domain,
            }
        )
    return records


def _write_tar(path: Path, samples: list[PretrainSample]) -> None:
    # A fixed mtime makes the same samples give byte-identical shards (and digests).
    with wds.TarWriter(str(path), mtime=0.0) as sink:
        for sample in samples:
            sink.write(
                {
                    "__key__": sample.key,
                    "json": {
                        "items": sample.items,
                        "first_query": sample.first_query,
                        "domain": sample.domain,
                        "domain_id": sample.domain_id,
                        "user": sample.user,
                        "sample_id": sample.sample_id,
                    },
                }
            )
