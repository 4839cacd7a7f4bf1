"""A tenant's adaptor bundle: what it is on disk and how the model is rebuilt from it.

An adaptor *bundle* is a directory of two files (format in docs/data-format.md)::

    spec.json     AdaptorSpec: how to rebuild the model skeleton, and its lineage
    trained.pt    state dict of the trained parameters only: the MoE adaptor and the encoder's
                  input LayerNorm (+ item ID embeddings, transductive); everything when the
                  whole model was trained

so a bundle stays small: the frozen backbone is not copied, it is loaded by its lineage
(``models:/<backbone_name>/<backbone_version>``) and the bundle applied on top. A *registered*
adaptor also carries that backbone, resolved when it is logged, as a third directory::

    backbone.json   BackboneConfig fields and text_dim
    backbone.pt     the backbone's state dict

so it loads and serves without the tracking server (adaptors/publish.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.model import BackboneConfig, SASRec, SequenceRecommender, UniSRec
from unisrec import tags as T
from unisrec.config import from_dict
from unisrec.errors import ConfigError, DataError

SPEC_FILE = "spec.json"
STATE_FILE = "trained.pt"
SPEC_VERSION = 1
BACKBONE_STATE_FILE = "backbone.pt"
BACKBONE_CONFIG_FILE = "backbone.json"


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
            T.KIND: "adaptor",
            T.TENANT: self.tenant,
            T.BACKBONE_NAME: self.backbone_name or "none",
            T.BACKBONE_VERSION: self.backbone_version,
            T.BACKBONE_RUN_ID: self.backbone_run_id,
            T.DATA_DIGEST: self.data_digest,
            T.DOMAIN: self.domain,
            T.MODE: self.mode,
            T.BASELINE: self.baseline,
            T.ENCODER: self.encoder.get("name", ""),
            T.ENCODER_DIM: str(self.encoder.get("dim", self.text_dim)),
        }


def backbone_lineage(tags: dict[str, str]) -> dict[str, str]:
    """From :func:`pull_backbone`'s tags, the spec fields naming the backbone."""
    return {
        "backbone_name": tags["name"],
        "backbone_version": tags["version"],
        "backbone_run_id": tags.get(T.RUN_ID, ""),
    }


def build_model(spec: AdaptorSpec, backbone: UniSRec | None = None) -> SequenceRecommender:
    """The model skeleton ``spec`` describes, with ``backbone``'s weights where it has them.

    A transductive model gets fresh item ID embeddings (the backbone has none).
    """
    cfg = from_dict(BackboneConfig, _without_removed_keys(spec.backbone_config))
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


def trained_state(model: SequenceRecommender, spec: AdaptorSpec) -> dict[str, torch.Tensor]:
    """The parameters a bundle stores: all of them, or only
    :meth:`SequenceRecommender.tuned_parameters` (adaptor, input LayerNorm, ID embeddings)."""
    state = model.state_dict()
    if not spec.trains_everything:
        tuned = {id(p) for p in model.tuned_parameters()}
        state = {n: p for n, p in model.named_parameters() if id(p) in tuned}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


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


def write_backbone(directory: Path, backbone: UniSRec) -> Path:
    """A backbone's weights as a plain directory (``backbone.json`` + ``backbone.pt``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    torch.save(state, directory / BACKBONE_STATE_FILE)
    meta = {"backbone_config": asdict(backbone.cfg), "text_dim": backbone.text_dim}
    (directory / BACKBONE_CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return directory


def read_backbone(directory: Path) -> UniSRec:
    """The backbone :func:`write_backbone` wrote, on the CPU in eval mode."""
    directory = Path(directory)
    meta = json.loads((directory / BACKBONE_CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = from_dict(BackboneConfig, _without_removed_keys(meta["backbone_config"]))
    model = UniSRec(cfg, text_dim=int(meta["text_dim"]))
    state = torch.load(directory / BACKBONE_STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_bundle(
    directory: Path, backbone_dir: Path | None = None
) -> tuple[SequenceRecommender, AdaptorSpec]:
    """Rebuild a tenant's model from a bundle on top of its backbone: read from
    ``backbone_dir`` (see :func:`write_backbone`) if given, else pulled from the registry by
    lineage. Returns the model on the CPU in eval mode and its spec.
    """
    spec = read_spec(directory)
    backbone = None
    if not spec.trains_everything:
        if backbone_dir is not None:
            backbone = read_backbone(backbone_dir)
        else:
            from pretrain.registry import load_backbone

            backbone = load_backbone(spec.backbone_uri)
    model = build_model(spec, backbone)
    state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (spec.trains_everything and missing):
        raise ValueError(
            f"{directory}: state does not fit the model: missing {missing}, unexpected {unexpected}"
        )
    return model.eval(), spec


def _without_removed_keys(backbone_config: dict) -> dict:
    """Bundles written before ``temperature`` left the backbone config still load."""
    return {k: v for k, v in backbone_config.items() if k != "temperature"}
