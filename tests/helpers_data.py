"""Small dataset directories for tests, written with the real writer (no text encoder needed).

Users walk the catalogue mostly one item at a time (``i -> i+1``), so a model can learn the
next item within an epoch or two; text vectors are random and distinct per item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sharding.config import ProcessingConfig, ShardJobConfig, ShardOutputConfig
from sharding.dataset_writer import EncodedDomain, write_dataset
from sharding.types import DomainSequences

TEST_ENCODER = {"name": "test-encoder", "dim": 8, "pooling": "cls", "max_length": 32}


def small_domain(
    name: str,
    num_users: int,
    num_items: int,
    rng: np.random.Generator,
    item_key: str = "{domain}-item-{i}",
) -> DomainSequences:
    """Users with 3-12 items each, mostly stepping to the next item (with some jumps).
    Item i (1-based) is keyed ``item_key.format(domain=name, i=i)``."""
    sequences = []
    for _ in range(num_users):
        length = int(rng.integers(3, 13))
        steps = np.where(rng.random(length) < 0.85, 1, rng.integers(2, num_items, size=length))
        start = int(rng.integers(0, num_items))
        sequences.append(((start + np.cumsum(steps)) % num_items + 1).astype(np.int64))
    return DomainSequences(
        name=name,
        item_keys=[item_key.format(domain=name, i=i) for i in range(1, num_items + 1)],
        item_texts=[f"{name} item number {i}" for i in range(1, num_items + 1)],
        user_keys=[f"{name}-user-{u}" for u in range(num_users)],
        sequences=sequences,
    )


def write_small_dataset(
    root: Path,
    domains: tuple[str, ...] = ("office",),
    num_users: int = 40,
    num_items: int = 30,
    dim: int = TEST_ENCODER["dim"],
    max_seq_len: int = 10,
    seed: int = 0,
    encoder_name: str = TEST_ENCODER["name"],
    pretrain_domains: tuple[str, ...] = (),
    item_key: str = "{domain}-item-{i}",
    heldout_fraction: float = 0.0,
) -> Path:
    """Write a dataset directory of ``domains`` under ``root``; returns its path."""
    rng = np.random.default_rng(seed)
    encoded = [
        EncodedDomain(
            sequences=small_domain(name, num_users, num_items, rng, item_key),
            pretrain=name in pretrain_domains,
            vectors=(vectors := rng.standard_normal((num_items, dim)).astype(np.float32)),
            worddrop_vectors=vectors + 0.1 if name in pretrain_domains else None,
        )
        for name in domains
    ]
    cfg = ShardJobConfig(
        domains=[],
        processing=ProcessingConfig(max_seq_len=max_seq_len),
        shards=ShardOutputConfig(num_shards=2, heldout_fraction=heldout_fraction),
    )
    encoder = {**TEST_ENCODER, "name": encoder_name, "dim": dim}
    write_dataset(Path(root), encoded, encoder, cfg)
    return Path(root)
