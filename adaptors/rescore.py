"""Re-score a registered adaptor (``unisrec evaluate``): load it from the registry, rank a
dataset domain's valid and test users, write ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adaptors.evaluate import full_report, load_eval_data
from adaptors.publish import load_adaptor
from sharding.dataset import Dataset
from unisrec.errors import DataError


def evaluate_registered(
    model_uri: str,
    data_dir: str,
    domain: str,
    out_dir: str,
    *,
    ks: list[int],
    exclude_history: bool = False,
    batch_size: int = 1024,
    groups: int = 5,
) -> dict:
    """Re-score a registered adaptor on a dataset's domain (default: the one it was trained
    on) and write ``<out_dir>/metrics.json``; returns the metrics.

    Text-only (inductive) adaptors score any domain encoded with their encoder; models with
    item IDs (transductive, SASRec) only the items they were trained on.
    """
    recommender = load_adaptor(model_uri)
    model, spec = recommender.model, recommender.spec
    dataset = Dataset(data_dir)
    domain = domain or spec.domain
    manifest = Path(data_dir) / "manifest.json"
    if (dataset.encoder_name, dataset.encoder_dim) != (spec.encoder["name"], spec.text_dim):
        raise DataError(
            f"encoded with {dataset.encoder_name!r} ({dataset.encoder_dim}-d), the adaptor with "
            f"{spec.encoder['name']!r} ({spec.text_dim}-d)",
            file=manifest,
            field="encoder",
        )
    uses_ids = spec.baseline == "sasrec" or spec.mode == "transductive"
    if uses_ids and (domain != spec.domain or dataset.domain(domain).num_items != spec.num_items):
        raise DataError(
            f"a {spec.mode} {spec.baseline} adaptor scores only the {spec.num_items} items of "
            f"{spec.domain!r} it was trained on",
            file=manifest,
            field=f"domains.{domain}",
        )
    data = load_eval_data(dataset, domain, model.max_seq_len, torch.device("cpu"))
    report = full_report(
        model,
        data,
        temperature=spec.temperature,
        ks=ks,
        exclude_history=exclude_history,
        batch_size=batch_size,
        groups=groups,
    )
    metrics = {
        "model": model_uri,
        "domain": domain,
        "mode": spec.mode,
        "baseline": spec.baseline,
        "backbone": spec.backbone_uri or "none",
        **report,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics
