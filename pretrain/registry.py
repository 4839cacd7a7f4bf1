"""The pretrained backbone in the MLflow model registry.

A registered version carries lineage tags (what made it) and an alias (``current`` by
default). It loads back in any process with only this package installed::

    model = load_backbone("models:/unisrec-backbone@current")   # -> pretrain.model.UniSRec
"""

from __future__ import annotations

import json
from dataclasses import asdict

import torch

from pretrain.model import BackboneConfig, UniSRec
from unisrec import tags as T
from unisrec.errors import ConfigError
from unisrec.runtime import library_output


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
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log ``model`` to run ``run_id``, register it as ``name``, tag and alias it
    (``extra_tags``: more version tags, e.g. which checkpoint it is).

    Returns the new model version.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    tags = {
        T.KIND: "backbone",
        T.DATA_DIGEST: data_digest,
        T.ENCODER: encoder,
        T.ENCODER_DIM: str(encoder_dim),
        T.CONFIG_HASH: config_hash,
        T.RUN_ID: run_id,
        **(extra_tags or {}),
    }
    model = model.cpu().eval()
    with mlflow.start_run(run_id=run_id), library_output():  # MLflow prints each registration
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
    client.set_registered_model_tag(name, T.KIND, "backbone")
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


def pull_backbone(uri: str, encoder_name: str, encoder_dim: int) -> tuple[UniSRec, dict[str, str]]:
    """Load a registered backbone after checking it was pretrained on the same text encoder.

    ``uri`` may use an alias; the model is loaded by the version the alias points to now, so
    the returned tags (``name``, ``version``, lineage) say exactly what was used.
    """
    from mlflow.exceptions import MlflowException

    try:
        tags = backbone_tags(uri)
    except MlflowException as err:
        raise ConfigError(f"backbone: {uri} is not in the model registry ({err.message})") from err
    want = (encoder_name, str(encoder_dim))
    have = (tags.get(T.ENCODER, ""), tags.get(T.ENCODER_DIM, ""))
    if have != want:
        raise ConfigError(
            f"backbone: {uri} was pretrained on text vectors of {have[0]!r} ({have[1]}-d) but the "
            f"dataset is encoded with {want[0]!r} ({want[1]}-d); re-shard the data with the "
            "backbone's encoder or pick a matching backbone"
        )
    return load_backbone(f"models:/{tags['name']}/{tags['version']}"), tags


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


# The BackboneConfig fields that decide the weights' shapes (dropouts and the init range
# may differ between a parent and the run that continues it).
SHAPE_FIELDS = (
    "hidden_size", "num_layers", "num_heads", "inner_size", "max_seq_len", "num_experts",
    "whitening",
)  # fmt: skip


def parent_backbone(
    uri: str, model_cfg: BackboneConfig, encoder_name: str, encoder_dim: int
) -> tuple[UniSRec, dict[str, str]]:
    """The registered backbone a pretraining continues from, after checking it fits.

    Its text encoder and vector size must be the dataset's and its model shape
    (:data:`SHAPE_FIELDS`) the config's; anything else is a ConfigError naming the
    ``init.backbone`` mismatch. Returns the model and its tags (``name``, ``version``, ...).
    """
    try:
        model, tags = pull_backbone(uri, encoder_name, encoder_dim)
    except ConfigError as err:
        raise ConfigError(f"init.{err}") from None
    have, want = asdict(model.cfg), asdict(model_cfg)
    differ = [
        f"{key} {have[key]} (config: {want[key]})" for key in SHAPE_FIELDS if have[key] != want[key]
    ]
    if differ:
        raise ConfigError(
            f"init.backbone: {uri} has model " + ", ".join(differ) + "; set model.* to the "
            "backbone's shape or pretrain from scratch"
        )
    return model, tags


def backbone_lineage(name: str, version: str, client=None) -> list[tuple[str, str]]:
    """``[(name, version), (parent name, parent version), ...]`` back to the first backbone
    (the one without :data:`unisrec.tags.PARENT_BACKBONE`), following the version tags."""
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    chain = [(name, str(version))]
    while True:
        parent = client.get_model_version(*chain[-1]).tags.get(T.PARENT_BACKBONE, "")
        if not parent or len(chain) > 1000:
            return chain
        parent_name, _, parent_version = parent.rpartition("/")
        if (parent_name, parent_version) in chain:  # a loop of hand-edited tags
            return chain
        chain.append((parent_name, parent_version))


def describe(uri: str) -> str:
    return json.dumps(backbone_tags(uri), indent=2)
