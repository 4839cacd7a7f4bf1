"""The shard job: raw domain files -> a dataset directory (``unisrec shard``).

1. read every domain with its adapter and process it (k-core, sequences, leave-one-out);
2. encode every distinct item text once (cached by content), plus the word-drop variant of
   the pretraining domains' texts;
3. write item tables, text vectors, splits, pretraining shards and the manifest, atomically.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sharding.config import ShardJobConfig
from sharding.dataset_writer import EncodedDomain, write_dataset
from sharding.encoding import encode_texts
from sharding.readers import read_domain
from sharding.text_encoder import word_drop
from unisrec.errors import DataError

log = logging.getLogger(__name__)


def run_shard_job(cfg: ShardJobConfig, out: str | Path, progress: bool = True) -> dict:
    """Run the whole job; returns the manifest written to ``out/manifest.json``."""
    started = time.perf_counter()
    domains = []
    for source in cfg.domains:
        seqs = read_domain(source, cfg.processing)
        if not seqs.user_keys:  # formats that keep a given split skip the filters' own check
            raise DataError(
                f"domain {seqs.name!r}: no users to train on (0 interactions read; "
                f"skipped by reason: {seqs.skipped or 'none'})",
                file=source.path,
            )
        log.info(
            "%s: %d users, %d items, %d interactions%s",
            seqs.name,
            len(seqs.user_keys),
            len(seqs.item_keys),
            seqs.num_interactions,
            f" (skipped {seqs.skipped})" if seqs.skipped else "",
        )
        domains.append((source, seqs))

    texts = sorted({t for _, seqs in domains for t in seqs.item_texts})
    log.info("encoding %d distinct item texts", len(texts))
    vectors, info = encode_texts(texts, cfg.encoder, progress=progress)
    row_of = {t: i for i, t in enumerate(texts)}

    # Word-drop variants are seeded per domain, so a re-run produces the same texts and the
    # embedding cache answers them.
    dropped: dict[str, list[str]] = {}
    for source, seqs in domains:
        if source.pretrain and source.word_drop:
            rng = random.Random(f"{cfg.shards.seed}:{seqs.name}")
            dropped[seqs.name] = [
                word_drop(t, cfg.encoder.word_drop_prob, rng) for t in seqs.item_texts
            ]
    dropped_texts = sorted({t for ts in dropped.values() for t in ts})
    if dropped_texts:
        log.info("encoding %d word-drop texts", len(dropped_texts))
        dropped_vectors, _ = encode_texts(dropped_texts, cfg.encoder, progress=progress)
        dropped_row = {t: i for i, t in enumerate(dropped_texts)}

    encoded = []
    for source, seqs in domains:
        own = vectors[
            np.fromiter(
                (row_of[t] for t in seqs.item_texts), dtype=np.int64, count=len(seqs.item_texts)
            )
        ]
        wd = None
        if source.pretrain and source.word_drop:
            rows = np.fromiter(
                (dropped_row[t] for t in dropped[seqs.name]),
                dtype=np.int64,
                count=len(seqs.item_texts),
            )
            wd = dropped_vectors[rows]
        encoded.append(EncodedDomain(seqs, source.pretrain, own.astype(np.float32), wd))

    manifest = write_dataset(Path(out), encoded, asdict(info), cfg)
    log.info("dataset written to %s in %.1f s", out, time.perf_counter() - started)
    return manifest
