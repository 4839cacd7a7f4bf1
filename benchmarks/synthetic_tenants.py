"""A throw-away MLflow store with promoted tenants, for the serving benchmarks.

:func:`build_tenants` writes a dataset of random text vectors (one domain a tenant, item keys
``<tenant>-<i>``), registers an untrained backbone as a pretrained one would be, and
fine-tunes each tenant for 0 epochs (ranking cost does not depend on training) and promotes
it, so the benchmarks time the same loading and ranking code a real tenant goes through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def item_key(tenant: str, index: int) -> str:
    """The key of a synthetic tenant's item ``index`` (1-based)."""
    return f"{tenant}-{index}"


def build_tenants(
    work: Path,
    catalogues: dict[str, int],
    users: int,
    backbone: dict | None = None,
    text_dim: int = 384,
) -> str:
    """Dataset, backbone and the promoted tenants ``{name: items}`` (``users`` random
    histories of 5-20 items each) under ``work``; returns the tracking URI.

    backbone: :class:`~pretrain.model.BackboneConfig` fields (default: the paper's shape).
    """
    import mlflow
    import torch

    from adaptors.config import FinetuneConfig
    from adaptors.finetune import run_finetune
    from pretrain.model import BackboneConfig, UniSRec
    from pretrain.registry import register_backbone
    from serving.lifecycle import promote
    from sharding.config import ProcessingConfig, ShardJobConfig, ShardOutputConfig
    from sharding.dataset_writer import EncodedDomain, write_dataset
    from sharding.types import DomainSequences
    from unisrec.config import from_dict
    from unisrec.tracking import configure_mlflow

    shape = from_dict(BackboneConfig, backbone or {})
    rng = np.random.default_rng(0)
    domains = []
    for name, items in catalogues.items():
        sequences = [
            rng.integers(1, items + 1, size=int(rng.integers(5, 21))).astype(np.int64)
            for _ in range(users)
        ]
        domains.append(
            EncodedDomain(
                sequences=DomainSequences(
                    name=name,
                    item_keys=[item_key(name, i) for i in range(1, items + 1)],
                    item_texts=[f"{name} item {i}" for i in range(1, items + 1)],
                    user_keys=[f"u{u}" for u in range(users)],
                    sequences=sequences,
                ),
                pretrain=False,
                vectors=rng.standard_normal((items, text_dim)).astype(np.float32),
                worddrop_vectors=None,
            )
        )
    data = work / "data"
    encoder = {"name": "bench-encoder", "dim": text_dim, "pooling": "cls", "max_length": 32}
    cfg = ShardJobConfig(
        domains=[],
        processing=ProcessingConfig(max_seq_len=shape.max_seq_len),
        shards=ShardOutputConfig(num_shards=1),
    )
    write_dataset(data, domains, encoder, cfg)

    uri = configure_mlflow(f"sqlite:///{work / 'mlflow.db'}")
    mlflow.set_experiment("bench-pretrain")
    with mlflow.start_run() as run:
        pass
    torch.manual_seed(0)
    register_backbone(
        UniSRec(shape, text_dim=text_dim),
        run_id=run.info.run_id,
        name="bench-backbone",
        alias="current",
        data_digest="bench",
        encoder="bench-encoder",
        encoder_dim=text_dim,
        config_hash="0" * 16,
    )
    for tenant in catalogues:
        finetune = from_dict(
            FinetuneConfig,
            {
                "tenant": tenant,
                "data": {"dir": str(data), "domain": tenant},
                "backbone": "models:/bench-backbone@current",
                "optim": {"max_epochs": 0},
                "mlflow": {"tracking_uri": uri},
                "output_root": str(work / "finetune"),
            },
        )
        run_finetune(finetune, progress=False)
        promote(tenant, by="bench")
    return uri
