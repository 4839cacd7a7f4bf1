"""Configuration of the fine-tuning job (``unisrec finetune CONFIG.yaml [key=value ...]``).

One config describes one tenant's adaptor; a ``tenants:`` list (or ``--tenants a,b``) runs the
same config for several tenants in parallel, each with its own overrides.

What trains, by ``baseline`` / ``backbone`` / ``mode`` / ``full_finetune``:

===========  ===========  =============  ==============  ====================================
baseline     backbone     mode           full_finetune   trained parameters
===========  ===========  =============  ==============  ====================================
unisrec      models:/...  inductive      false           MoE adaptor + the encoder's input
                                                         LayerNorm (Transformer blocks and
                                                         positions frozen, as the official)
unisrec      models:/...  transductive   false           the same + item ID embeddings
unisrec      models:/...  either         true            everything
unisrec      none         either         (ignored)       everything: UniSRec from scratch,
                                                         the paper's "from scratch" rows
sasrec       (shape)      (ignored)      (ignored)       everything: ID-only SASRec
===========  ===========  =============  ==============  ====================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pretrain.model import BackboneConfig
from unisrec.config import check_range
from unisrec.errors import ConfigError
from unisrec.tags import (
    adaptor_model_name,
    finetune_experiment_name,
    validate_model_name,
    validate_tenant_name,
)


@dataclass
class FinetuneDataConfig:
    dir: str = "runs/data"  # dataset directory written by `unisrec shard`
    domain: str = ""  # target domain inside it (must be set)
    # Train on this fraction of the domain's users (a data-scarce tenant), drawn with `seed`;
    # valid and test keep every user.
    train_fraction: float = 1.0

    def validate(self) -> None:
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"train_fraction: must be in (0, 1], got {self.train_fraction}")


@dataclass
class FinetuneOptimConfig:
    lr: float = 1e-3  # Adam learning rate (the paper's)
    batch_size: int = 1024  # next-item targets per step (the official code: 2,048)
    max_epochs: int = 50
    patience: int = 10  # epochs without a better valid metric before stopping
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    bucket_by_length: bool = True  # batch windows of similar length (far less padding)

    def validate(self) -> None:
        check_range("lr", self.lr, 0, low_open=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("grad_clip", self.grad_clip, 0)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_epochs < 0 or self.patience < 1:
            raise ConfigError("max_epochs must be >= 0 and patience >= 1")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50])  # cut-offs of Recall@K and NDCG@K
    exclude_history: bool = False  # drop the user's history items from the ranking
    batch_size: int = 1024  # users scored at once (a block of users)
    item_block: int = 16384  # items scored at once; memory ~ batch_size x item_block floats
    stop_metric: str = "ndcg@10"  # valid metric for early stopping and the best state
    popularity_groups: int = 5  # long-tail breakdown of test metrics by target popularity

    def validate(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks: need positive cut-offs, got {self.ks}")
        allowed = {f"{m}@{k}" for m in ("recall", "ndcg") for k in self.ks}
        if self.stop_metric not in allowed:
            raise ConfigError(f"stop_metric: {self.stop_metric!r} is not one of {sorted(allowed)}")
        check_range("batch_size", self.batch_size, 1)
        check_range("item_block", self.item_block, 1)
        check_range("popularity_groups", self.popularity_groups, 1)


@dataclass
class FinetuneMlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    # "" = unisrec-finetune-<tenant>: each tenant's runs in an experiment of its own, so a
    # tracking server with users can let each tenant see only its own runs
    experiment: str = ""
    registered_model: str = ""  # "" = unisrec-adaptor-<tenant>
    alias: str = "candidate"  # `unisrec promote` moves "production" (what `unisrec serve` serves)


@dataclass
class TenantSpec:
    """One tenant of a multi-tenant run: its name and dotted overrides of the shared config.

    ``{"name": "office", "overrides": {"data.domain": "office", "mode": "transductive"}}``
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        validate_tenant_name(self.name)
        for key in self.overrides:
            if key.split(".")[0] in ("tenant", "tenants", "output_dir"):
                raise ConfigError(f"overrides: '{key}' is set per tenant by the runner")


@dataclass
class FinetuneConfig:
    tenant: str = ""  # who the adaptor is for; names the model, run and output directory
    tenants: list[TenantSpec] = field(default_factory=list)  # run several tenants instead
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    # models:/NAME@ALIAS or models:/NAME/VERSION, or "none" to train from scratch with `model`
    backbone: str = "none"
    model: BackboneConfig = field(default_factory=BackboneConfig)  # used only when backbone: none
    mode: Literal["inductive", "transductive"] = "inductive"  # transductive adds item IDs
    full_finetune: bool = False  # train the backbone too (for comparison)
    baseline: Literal["unisrec", "sasrec"] = "unisrec"
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    temperature: float = 0.07  # tau of the cosine logits (UniSRec only; SASRec uses dot products)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mlflow: FinetuneMlflowConfig = field(default_factory=FinetuneMlflowConfig)
    output_root: str = "runs/finetune"  # parent of per-tenant output directories
    output_dir: str = ""  # "" = <output_root>/<tenant>
    seed: int = 0
    device: str = "auto"  # auto = cuda if available, else cpu

    def validate(self) -> None:
        if self.tenant:
            validate_tenant_name(self.tenant)
            if self.mlflow.registered_model:
                validate_model_name(self.mlflow.registered_model, self.tenant)
        if self.backbone != "none" and not self.backbone.startswith("models:/"):
            raise ConfigError(
                f"backbone: {self.backbone!r} must be models:/NAME@ALIAS, models:/NAME/VERSION or none"
            )
        check_range("temperature", self.temperature, 0, low_open=True)
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ConfigError(f"tenants: duplicate names in {names}")

    @property
    def model_name(self) -> str:
        """The registered model of this tenant's adaptor."""
        return self.mlflow.registered_model or adaptor_model_name(self.tenant)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment of this tenant's fine-tune runs."""
        return self.mlflow.experiment or finetune_experiment_name(self.tenant)

    @property
    def resolved_output_dir(self) -> str:
        return self.output_dir or f"{self.output_root.rstrip('/')}/{self.tenant}"

    @property
    def trains_everything(self) -> bool:
        """From scratch, SASRec and full fine-tuning train every parameter."""
        return self.full_finetune or self.backbone == "none" or self.baseline == "sasrec"
