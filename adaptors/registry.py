"""A tenant's adaptor: what it is on disk, how it is registered, how it loads back.

An adaptor *bundle* is a directory of two files (format in docs/data-format.md)::

    spec.json     AdaptorSpec: how to rebuild the model skeleton, and its lineage
    trained.pt    state dict of the trained parameters only: the MoE adaptor (+ item ID
                  embeddings, transductive); everything when the whole model was trained

so a registered adaptor stays small: the frozen backbone is not copied, it is loaded by its
lineage (``models:/<backbone_name>/<backbone_version>``) and the bundle applied on top.

Each tenant registers its own model (``unisrec-adaptor-<tenant>`` by default), tagged
``unisrec.tenant`` on the registered model so one tenant can never overwrite another's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adaptors.config import validate_tenant_name
from adaptors.sasrec import SASRec
from pretrain.model import BackboneConfig, UniSRec
from pretrain.registry import TAG_ENCODER, TAG_ENCODER_DIM, TAG_RUN_ID
from sharding.errors import DataError
from unisrec.config import ConfigError, from_dict

SPEC_FILE = "spec.json"
STATE_FILE = "trained.pt"
SPEC_VERSION = 1
# MLflow reserves the alias "latest": models:/NAME@latest always means the highest version.
LATEST = "latest"

# Lineage tags of an adaptor model version (docs/data-format.md, "Registry tags").
TAG_TENANT = "unisrec.tenant"
TAG_BACKBONE_NAME = "unisrec.backbone_name"
TAG_BACKBONE_VERSION = "unisrec.backbone_version"
TAG_BACKBONE_RUN_ID = "unisrec.backbone_run_id"
TAG_DATA_DIGEST = "unisrec.data_digest"
TAG_DOMAIN = "unisrec.domain"
TAG_MODE = "unisrec.mode"
TAG_BASELINE = "unisrec.baseline"
TAG_KIND = "unisrec.kind"


@dataclass
class AdaptorSpec:
    """Everything needed to rebuild a tenant's model around its trained parameters."""

    tenant: str
    baseline: str  # unisrec | sasrec
    mode: str  # inductive | transductive
    trains_everything: bool  # trained.pt holds the whole model; no backbone is loaded
    backbone_config: dict  # BackboneConfig fields
    text_dim: int  # D of the text vectors
    num_items: int  # N of the domain it was trained on (ID embeddings have N+1 rows)
    temperature: float
    domain: str
    data_digest: str
    encoder: dict  # name, dim, pooling, max_length of the text encoder
    backbone_name: str = ""  # "" = trained from scratch
    backbone_version: str = ""
    backbone_run_id: str = ""
    format_version: int = SPEC_VERSION

    @property
    def backbone_uri(self) -> str:
        return f"models:/{self.backbone_name}/{self.backbone_version}" if self.backbone_name else ""

    def lineage_tags(self) -> dict[str, str]:
        return {
            TAG_KIND: "adaptor",
            TAG_TENANT: self.tenant,
            TAG_BACKBONE_NAME: self.backbone_name or "none",
            TAG_BACKBONE_VERSION: self.backbone_version,
            TAG_BACKBONE_RUN_ID: self.backbone_run_id,
            TAG_DATA_DIGEST: self.data_digest,
            TAG_DOMAIN: self.domain,
            TAG_MODE: self.mode,
            TAG_BASELINE: self.baseline,
            TAG_ENCODER: self.encoder.get("name", ""),
            TAG_ENCODER_DIM: str(self.encoder.get("dim", self.text_dim)),
        }


# --- backbones -------------------------------------------------------------------------


def pull_backbone(uri: str, encoder_name: str, encoder_dim: int) -> tuple[UniSRec, dict[str, str]]:
    """Load a registered backbone after checking it was pretrained on the same text encoder.

    ``uri`` may use an alias; the model is loaded by the version the alias points to now, so
    the returned tags (``name``, ``version``, lineage) say exactly what was used.
    """
    from mlflow.exceptions import MlflowException

    from pretrain.registry import backbone_tags, load_backbone

    try:
        tags = backbone_tags(uri)
    except MlflowException as err:
        raise ConfigError(f"backbone: {uri} is not in the model registry ({err.message})") from err
    want = (encoder_name, str(encoder_dim))
    have = (tags.get(TAG_ENCODER, ""), tags.get(TAG_ENCODER_DIM, ""))
    if have != want:
        raise ConfigError(
            f"backbone: {uri} was pretrained on text vectors of {have[0]!r} ({have[1]}-d) but the "
            f"dataset is encoded with {want[0]!r} ({want[1]}-d); re-shard the data with the "
            "backbone's encoder or pick a matching backbone"
        )
    return load_backbone(f"models:/{tags['name']}/{tags['version']}"), tags


def backbone_lineage(tags: dict[str, str]) -> dict[str, str]:
    """From :func:`pull_backbone`'s tags, the spec fields naming the backbone."""
    return {
        "backbone_name": tags["name"],
        "backbone_version": tags["version"],
        "backbone_run_id": tags.get(TAG_RUN_ID, ""),
    }


def build_model(spec: AdaptorSpec, backbone: UniSRec | None = None) -> nn.Module:
    """The model skeleton ``spec`` describes, with ``backbone``'s weights where it has them.

    A transductive model gets fresh item ID embeddings (the backbone has none).
    """
    cfg = from_dict(BackboneConfig, spec.backbone_config)
    if spec.baseline == "sasrec":
        return SASRec(cfg, spec.num_items)
    num_ids = spec.num_items if spec.mode == "transductive" else 0
    model = UniSRec(cfg, text_dim=spec.text_dim, num_items=num_ids)
    if backbone is not None:
        missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
        if unexpected or any(not k.startswith("item_ids.") for k in missing):
            raise ValueError(
                f"backbone does not fit the model: missing {missing}, unexpected {unexpected}"
            )
    return model


# --- bundles on disk -------------------------------------------------------------------


def trained_state(model: nn.Module, spec: AdaptorSpec) -> dict[str, torch.Tensor]:
    """The parameters a bundle stores: all of them, or only the adaptor's (+ ID embeddings)."""
    state = model.state_dict()
    if spec.trains_everything:
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    keep = ("adaptor.", "item_ids.")
    return {k: v.detach().cpu().clone() for k, v in state.items() if k.startswith(keep)}


def write_bundle(directory: Path, spec: AdaptorSpec, state: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2), encoding="utf-8")
    return directory


def read_spec(directory: Path) -> AdaptorSpec:
    path = Path(directory) / SPEC_FILE
    raw = json.loads(path.read_text(encoding="utf-8"))
    if raw.get("format_version") != SPEC_VERSION:
        raise DataError(
            f"adaptor spec version {raw.get('format_version')!r}, this reader reads {SPEC_VERSION}",
            file=path,
            field="format_version",
        )
    try:
        return from_dict(AdaptorSpec, raw)
    except ConfigError as err:
        raise DataError(str(err), file=path) from err


def load_bundle(directory: Path) -> tuple[nn.Module, AdaptorSpec]:
    """Rebuild a tenant's model from a bundle, pulling its backbone by lineage if needed.

    Returns the model on the CPU in eval mode and its spec.
    """
    from pretrain.registry import load_backbone

    spec = read_spec(directory)
    backbone = None
    if not spec.trains_everything:
        backbone = load_backbone(spec.backbone_uri)
    model = build_model(spec, backbone)
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (spec.trains_everything and missing):
        raise ValueError(
            f"{directory}: state does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return model.eval(), spec


# --- the registry ----------------------------------------------------------------------


def claim_model_name(name: str, tenant: str) -> None:
    """Refuse to register ``name`` for ``tenant`` when it exists and is not that tenant's.

    A registered model without a ``unisrec.tenant`` tag (a backbone, say) is not ours either.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    validate_tenant_name(tenant)
    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return  # does not exist yet
        raise  # the registry did not answer the question (down, denied, ...)
    owner = model.tags.get(TAG_TENANT)
    if owner != tenant:
        raise ConfigError(
            f"mlflow.registered_model: {name!r} already exists and belongs to "
            f"{'tenant ' + repr(owner) if owner else 'no tenant'}; refusing to register tenant {tenant!r} over it"
        )


def register_adaptor(
    *, run_id: str, name: str, alias: str, bundle_dir: Path, catalogue_dir: Path, spec: AdaptorSpec
) -> str:
    """Log the bundle and catalogue as a pyfunc model to ``run_id``, register it as ``name``
    with lineage tags, point ``alias`` at it. Returns the new version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from adaptors.serving import AdaptorRecommender, pyfunc_signature

    claim_model_name(name, spec.tenant)
    client = MlflowClient()
    try:
        client.create_registered_model(name, tags={TAG_TENANT: spec.tenant, TAG_KIND: "adaptor"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        claim_model_name(name, spec.tenant)  # created meanwhile: still ours?
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="adaptor",
            python_model=AdaptorRecommender(),
            artifacts={"adaptor": str(bundle_dir), "catalogue": str(catalogue_dir)},
            signature=pyfunc_signature(),
            pip_requirements=["unisrec"],
            registered_model_name=name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    for key, value in spec.lineage_tags().items():
        client.set_model_version_tag(name, version, key, value)
    if alias.lower() != LATEST:
        client.set_registered_model_alias(name, alias, version)
    return version


def load_adaptor(uri: str):
    """Load a registered adaptor as its :class:`adaptors.serving.AdaptorRecommender`
    (``.model``, ``.spec``, ``.catalogue``), backbone pulled by lineage."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri).unwrap_python_model()
