"""Write a dataset directory: item tables, text vectors, splits, shards and the manifest.

Everything is written into a staging directory beside the target and moved into place only
when complete, so an interrupted job leaves either the previous dataset or none — never a
manifest that points at missing or half-written files.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sharding.atomic import replace_directory, sha256_file
from sharding.config import ShardJobConfig
from sharding.dataset import FORMAT_VERSION, MANIFEST
from sharding.pretrain_shards import (
    SAMPLE_VERSION,
    heldout_users,
    pretraining_samples,
    write_heldout_shards,
    write_shards,
)
from sharding.processing import leave_one_out
from sharding.types import DomainSequences
from unisrec.config import to_dict


@dataclass
class EncodedDomain:
    """A processed domain with its text vectors, ready to be written."""

    sequences: DomainSequences
    pretrain: bool
    vectors: np.ndarray  # (num_items, D) float32, row i-1 = local item i
    worddrop_vectors: np.ndarray | None  # (num_items, D) float32, pretraining domains only


def write_dataset(
    out: Path, domains: list[EncodedDomain], encoder: dict, cfg: ShardJobConfig
) -> dict:
    """Write all of ``domains`` under ``out`` and return the manifest."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        manifest = _write_into(staging, domains, encoder, cfg)
        replace_directory(staging, out)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_into(
    root: Path, domains: list[EncodedDomain], encoder: dict, cfg: ShardJobConfig
) -> dict:
    max_seq_len = cfg.processing.max_seq_len
    domain_entries: dict[str, dict] = {}
    offset = 0
    pretrain_inputs = []
    for domain_id, enc in enumerate(domains):
        seqs = enc.sequences
        base = Path("domains") / seqs.name
        (root / base).mkdir(parents=True)
        files = {
            "items": _write_items(root, base, seqs, offset),
            "users": _write_parquet(
                root,
                base / "users.parquet",
                pd.DataFrame({"index": range(len(seqs.user_keys)), "key": seqs.user_keys}),
            ),
            **_write_splits(root, base, seqs, max_seq_len),
            "embeddings": _write_vectors(root, base / "embeddings.npy", enc.vectors),
        }
        if enc.worddrop_vectors is not None:
            files["embeddings_worddrop"] = _write_vectors(
                root, base / "embeddings_worddrop.npy", enc.worddrop_vectors
            )
        domain_entries[seqs.name] = {
            "domain_id": domain_id,
            "num_users": len(seqs.user_keys),
            "num_items": len(seqs.item_keys),
            "num_interactions": seqs.num_interactions,
            "offset": offset,
            "pretrain": enc.pretrain,
            "skipped": dict(seqs.skipped),
            "ties": dict(seqs.ties) if seqs.ties is not None else None,
            "files": files,
        }
        if enc.pretrain:
            train = [s[:-2] for s in seqs.sequences]
            pretrain_inputs.append((seqs.name, domain_id, offset, train))
        offset += len(seqs.item_keys)

    shards = None
    if pretrain_inputs:
        samples = pretraining_samples(pretrain_inputs, max_seq_len, cfg.shards.window_stride)
        held = heldout_users(pretrain_inputs, cfg.shards.heldout_fraction, cfg.shards.seed)
        train = [s for s in samples if (s.domain, s.user) not in held]
        records = write_shards(train, root / "shards", cfg.shards.num_shards, cfg.shards.seed)
        heldout = write_heldout_shards(
            [s for s in samples if (s.domain, s.user) in held], root / "shards"
        )
        shards = {
            "dir": "shards",
            "sample_version": SAMPLE_VERSION,
            "max_seq_len": max_seq_len,
            "window_stride": cfg.shards.window_stride,
            "num_samples": sum(r["num_samples"] for r in records),
            "domains": [name for name, *_ in pretrain_inputs],
            "files": records,
            "heldout_fraction": cfg.shards.heldout_fraction,
            "heldout": heldout,
        }

    digests = {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "encoder": encoder,
        "domains": domain_entries,
        "shards": shards,
        "files": digests,
        "digest": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
        "config": to_dict(cfg),
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def _write_items(root: Path, base: Path, seqs: DomainSequences, offset: int) -> dict:
    n = len(seqs.item_keys)
    table = pd.DataFrame(
        {
            "index": np.arange(1, n + 1, dtype=np.int64),
            "global_index": np.arange(offset + 1, offset + n + 1, dtype=np.int64),
            "key": seqs.item_keys,
            "text": seqs.item_texts,
        }
    )
    return _write_parquet(root, base / "items.parquet", table)


def _write_splits(root: Path, base: Path, seqs: DomainSequences, max_seq_len: int) -> dict:
    rows = {"train": [], "valid": [], "test": []}
    for user, sequence in enumerate(seqs.sequences):
        train, (valid_hist, valid_target), (test_hist, test_target) = leave_one_out(
            sequence, max_seq_len
        )
        rows["train"].append((user, np.asarray(train, dtype=np.int64)))
        rows["valid"].append((user, np.asarray(valid_hist, dtype=np.int64), int(valid_target)))
        rows["test"].append((user, np.asarray(test_hist, dtype=np.int64), int(test_target)))
    return {
        "train": _write_parquet(
            root, base / "train.parquet", pd.DataFrame(rows["train"], columns=["user", "items"])
        ),
        "valid": _write_parquet(
            root,
            base / "valid.parquet",
            pd.DataFrame(rows["valid"], columns=["user", "history", "target"]),
        ),
        "test": _write_parquet(
            root,
            base / "test.parquet",
            pd.DataFrame(rows["test"], columns=["user", "history", "target"]),
        ),
    }


def _write_parquet(root: Path, rel: Path, frame: pd.DataFrame) -> dict:
    frame.to_parquet(root / rel, index=False)
    return {"path": str(rel), "rows": len(frame)}


def _write_vectors(root: Path, rel: Path, vectors: np.ndarray) -> dict:
    """Rows shifted by one so local index i is row i; row 0 (padding) is zeros."""
    table = np.zeros((vectors.shape[0] + 1, vectors.shape[1]), dtype=np.float32)
    table[1:] = vectors
    np.save(root / rel, table)
    return {"path": str(rel), "shape": list(table.shape), "dtype": "float32"}
