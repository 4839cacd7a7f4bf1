"""How often one user's windows share a pretraining batch, and what masking by window missed.

A user's training sequence is cut into overlapping windows (``shards.window_stride``), and
length buckets group windows of similar length, often one user's siblings. A loss masked by
*window* then used the user's own items from a sibling window as sequence-item negatives,
and the sibling's identical prefixes as sequence-sequence negatives. This streams epochs
exactly as the pretraining workers do (every rank's shards, batch size, buckets, seed) and
counts, per global batch:

    queries_with_sibling   queries whose user has another window in the global batch
    si_pairs_unmasked      (query, candidate) pairs a window mask kept as negatives that the
                           user mask drops: batch targets held by a sibling window only
    ss_pairs_unmasked      (query, key) pairs of one user's prefixes from different windows

    python -m experiments.sibling_windows benchmarks/configs/pretrain-shared.yaml \\
        data.dir=runs/shared-data [--epochs 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

import torch

from pretrain.config import PretrainConfig
from sharding.dataset import Dataset
from sharding.stream import ShardStream
from unisrec.config import load_config
from unisrec.tracking import git_commit


def global_batches(cfg: PretrainConfig, epoch: int):
    """Yield each step's global batch as a list of ``(user, items, first_query)`` rows."""
    dataset = Dataset(cfg.data.dir)
    specs = dataset.shard_specs(cfg.data.shard_base or None, cfg.data.domains)
    world = cfg.distributed.num_workers
    streams = [
        ShardStream(
            specs, batch_size=cfg.data.batch_size, rank=rank, world_size=world,
            num_workers=0, seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            bucket_batches=cfg.data.bucket_batches,
        ).epoch(epoch)
        for rank in range(world)
    ]  # fmt: skip
    for per_rank in zip(*streams, strict=True):
        rows = []
        for batch in per_rank:
            for r in torch.nonzero(batch["lengths"] > 0).flatten().tolist():
                n = int(batch["lengths"][r])
                rows.append(
                    (
                        int(batch["user"][r]),
                        batch["items"][r, :n].tolist(),
                        int(batch["first_query"][r]),
                    )
                )
        yield rows


def count_batch(rows: list[tuple[int, list[int], int]]) -> Counter:
    """The counts of the module docstring for one global batch."""
    queries = [
        (w, t) for w, (_, items, first) in enumerate(rows) for t in range(first, len(items) - 1)
    ]
    targets = {rows[w][1][t + 1] for w, t in queries}
    windows_of = defaultdict(list)
    for w, (user, _, _) in enumerate(rows):
        windows_of[user].append(w)
    queries_of_window = Counter(w for w, _ in queries)
    counts = Counter(queries=len(queries), global_batches=1)
    for w, t in queries:
        user, items, _ = rows[w]
        siblings = [s for s in windows_of[user] if s != w]
        if not siblings:
            continue
        counts["queries_with_sibling"] += 1
        sibling_items = {x for s in siblings for x in rows[s][1]}
        own = set(items)
        counts["si_pairs_unmasked"] += len((targets & sibling_items) - own - {items[t + 1]})
        counts["ss_pairs_unmasked"] += sum(queries_of_window[s] for s in siblings)
    counts["batches_with_sibling"] += int(any(len(ws) > 1 for ws in windows_of.values()))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the counts as JSON here")
    args = parser.parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    total = Counter()
    for epoch in range(args.epochs):
        for rows in global_batches(cfg, epoch):
            total += count_batch(rows)
    result = {
        "commit": git_commit(),
        "load": [round(x, 2) for x in os.getloadavg()],  # counts: independent of load
        "config": args.config,
        "overrides": args.overrides,
        "epochs": args.epochs,
        "global_batch": cfg.data.batch_size * cfg.distributed.num_workers,
        "bucket_batches": cfg.data.bucket_batches,
        **dict(total),
        "share_queries_with_sibling": total["queries_with_sibling"] / max(total["queries"], 1),
        "share_batches_with_sibling": total["batches_with_sibling"]
        / max(total["global_batches"], 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
