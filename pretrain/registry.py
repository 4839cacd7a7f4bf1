"""The pretrained backbone in the MLflow model registry.

A registered version carries lineage tags (what made it) and an alias (``current`` by
default). It loads back in any process with only this package installed::

    model = load_backbone("models:/unisrec-backbone@current")   # -> pretrain.model.UniSRec
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from pretrain.model import UniSRec

# Tag names: what a fine-tune job checks before it trusts a backbone (docs/data-format.md).
TAG_DATA_DIGEST = "unisrec.data_digest"
TAG_ENCODER = "unisrec.encoder"
TAG_ENCODER_DIM = "unisrec.encoder_dim"
TAG_CONFIG_HASH = "unisrec.config_hash"
TAG_RUN_ID = "unisrec.run_id"
TAG_KIND = "unisrec.kind"


def register_backbone(
    model: UniSRec,
    *,
    run_id: str,
    name: str,
    alias: str,
    data_digest: str,
    encoder: str,
    encoder_dim: int,
    config_hash: str,
) -> str:
    """Log ``model`` to run ``run_id``, register it as ``name``, tag and alias it.

    Returns the new model version.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    tags = {
        TAG_KIND: "backbone",
        TAG_DATA_DIGEST: data_digest,
        TAG_ENCODER: encoder,
        TAG_ENCODER_DIM: str(encoder_dim),
        TAG_CONFIG_HASH: config_hash,
        TAG_RUN_ID: run_id,
    }
    model = model.cpu().eval()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="backbone",
            serialization_format="pickle",
            registered_model_name=name,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "unisrec"],
            metadata={"backbone_config": asdict(model.cfg), "text_dim": model.text_dim, **tags},
            await_registration_for=60,
        )
        mlflow.log_dict(
            {"backbone_config": asdict(model.cfg), "text_dim": model.text_dim},
            "backbone_config.json",
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_tag(name, TAG_KIND, "backbone")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)
    return version


def load_backbone(uri: str) -> UniSRec:
    """Load a registered backbone (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``)."""
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    if not isinstance(model, UniSRec):
        raise TypeError(f"{uri} is a {type(model).__name__}, not a UniSRec backbone")
    return model


def backbone_tags(uri: str) -> dict[str, str]:
    """The lineage tags and version of a registered backbone (for the adaptor's own tags)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name, version = _resolve(uri, client)
    mv = client.get_model_version(name, version)
    return {"name": name, "version": str(mv.version), **mv.tags}


def _resolve(uri: str, client) -> tuple[str, str]:
    if not uri.startswith("models:/"):
        raise ValueError(
            f"not a registry URI: {uri!r} (expected models:/NAME@ALIAS or models:/NAME/VERSION)"
        )
    ref = uri[len("models:/") :]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias).version
    name, _, version = ref.partition("/")
    if not version.isdigit():
        raise ValueError(f"not a registry URI: {uri!r}")
    return name, version


def describe(uri: str) -> str:
    return json.dumps(backbone_tags(uri), indent=2)
