"""Names the platform writes into the MLflow registry, and the rule for tenant names.

Every registry tag, model-name prefix and alias the jobs set or read is defined here once
(their meaning: docs/data-format.md, "Registry tags").
"""

from __future__ import annotations

import re

from unisrec.errors import ConfigError

# Registered model names.
BACKBONE_MODEL = "unisrec-backbone"  # the pretraining job's default
# Backbones are BACKBONE_MODEL and BACKBONE_MODEL-<suffix> (e.g. an experiment grid's cells).
ADAPTOR_MODEL_PREFIX = "unisrec-adaptor-"  # + tenant name
# A tenant's fine-tune runs go to an experiment of its own (permissions on a tracking server
# with users are per experiment).
FINETUNE_EXPERIMENT_PREFIX = "unisrec-finetune-"  # + tenant name
# MLflow reserves the alias "latest": models:/NAME@latest always means the highest version.
LATEST = "latest"
# Adaptor aliases: a fine-tune registers its version as the candidate; `unisrec promote`
# moves production, which is what `unisrec serve` serves.
CANDIDATE = "candidate"
PRODUCTION = "production"

# Tags on a model version (and, for KIND and TENANT, on the registered model).
KIND = "unisrec.kind"  # backbone | adaptor (on runs: pretrain | finetune)
TENANT = "unisrec.tenant"
DATA_DIGEST = "unisrec.data_digest"
ENCODER = "unisrec.encoder"
ENCODER_DIM = "unisrec.encoder_dim"
CONFIG_HASH = "unisrec.config_hash"
RUN_ID = "unisrec.run_id"
BACKBONE_NAME = "unisrec.backbone_name"
BACKBONE_VERSION = "unisrec.backbone_version"
BACKBONE_RUN_ID = "unisrec.backbone_run_id"
DOMAIN = "unisrec.domain"
MODE = "unisrec.mode"
BASELINE = "unisrec.baseline"
# Set on an adaptor version by `unisrec promote` (who, when, which version it replaced).
PROMOTED_BY = "unisrec.promoted_by"
PROMOTED_AT = "unisrec.promoted_at"  # ISO 8601, UTC
PROMOTED_FROM = "unisrec.promoted_from"  # the production version before, or "none"
# Set with them: the promotion gate's comparison (serving/gate.py) and, past a refusal, who
# forced it. Values are numbers as text, or "none" where a side has no such metric.
GATE_METRIC = "unisrec.gate_metric"  # the validation metric compared, e.g. ndcg@10
GATE_VALUE = "unisrec.gate_value"  # this version's valid metric
GATE_PRODUCTION_VALUE = "unisrec.gate_production_value"  # the replaced production's
GATE_TOLERANCE = "unisrec.gate_tolerance"  # the absolute drop allowed
GATE_DECISION = "unisrec.gate_decision"  # the gate's one line
FORCED_BY = "unisrec.forced_by"  # who promoted it although the gate refused (else absent)
# Set on a version made by `unisrec catalogue add`: same weights, a longer catalogue.
EXTENDS_VERSION = "unisrec.extends_version"
ADDED_ITEMS = "unisrec.added_items"
# On a backbone version: the checkpoint it is (lowest held-out pretraining loss, or the last).
CHECKPOINT_STEP = "unisrec.checkpoint_step"
CHECKPOINT_EPOCH = "unisrec.checkpoint_epoch"  # epochs completed at that step (fractional)
HELDOUT_LOSS = "unisrec.heldout_loss"  # its held-out loss ("none" without held-out shards)
# On a backbone version continued from another (`init.backbone`): the version it started
# from, as NAME/VERSION, and that version's pretraining run; absent on a first backbone.
PARENT_BACKBONE = "unisrec.parent_backbone"
PARENT_RUN_ID = "unisrec.parent_run_id"

# On a fine-tune run (read back by the promotion gate and `recommend-batch --all-users`).
VALID_METRIC_PREFIX = "best_valid_"  # + metric with '@' as '_at_': best_valid_ndcg_at_10
DATA_DIR_PARAM = "data.dir"  # the dataset directory it was fine-tuned on (absolute)

# Tenant names end up in model names, run names and directory names: keep them boring.
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def validate_tenant_name(name: str) -> str:
    """Return ``name`` if it matches ``^[a-z0-9][a-z0-9_-]{0,62}$``, else raise ConfigError.

    The pattern alone rules out path separators, ``..``, upper case and the empty name.
    """
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise ConfigError(
            f"tenant: {name!r} is not a valid tenant name "
            "(1-63 of a-z, 0-9, '_', '-', starting with a letter or digit)"
        )
    return name


def adaptor_model_name(tenant: str) -> str:
    """The registered model a tenant's adaptor goes to by default."""
    return ADAPTOR_MODEL_PREFIX + validate_tenant_name(tenant)


def finetune_experiment_name(tenant: str) -> str:
    """The MLflow experiment a tenant's fine-tune runs go to by default."""
    return FINETUNE_EXPERIMENT_PREFIX + validate_tenant_name(tenant)


def is_backbone_model(name: str) -> bool:
    """Whether a registered model name is a backbone's (``unisrec-backbone[-...]``)."""
    return name == BACKBONE_MODEL or name.startswith(BACKBONE_MODEL + "-")


def model_variant(name: str, tenant: str) -> str | None:
    """The ``VARIANT`` of ``unisrec-adaptor-<tenant>.VARIANT`` (None for any other name)."""
    own = adaptor_model_name(tenant)
    return name[len(own) + 1 :] if name.startswith(f"{own}.") else None


def variant_model_name(tenant: str, variant: str) -> str:
    """``unisrec-adaptor-<tenant>.<variant>``; ConfigError unless ``variant`` is 1-63 of a-z,
    0-9, '_', '-' (the tenant names' pattern)."""
    if not TENANT_PATTERN.fullmatch(variant):
        raise ConfigError(
            f"variant: {variant!r} is not a valid variant "
            "(1-63 of a-z, 0-9, '_', '-', starting with a letter or digit)"
        )
    return f"{adaptor_model_name(tenant)}.{variant}"


def validate_model_name(name: str, tenant: str) -> str:
    """Return ``name`` if ``tenant`` may register it, else raise ConfigError.

    A tenant's names are ``unisrec-adaptor-<tenant>`` and ``unisrec-adaptor-<tenant>.<variant>``
    (variant: a-z, 0-9, '_', '-'). The '.' cannot occur in a tenant name, so no tenant's
    variant is another tenant's name; everything else (other tenants', the backbone's) is
    reserved.
    """
    own = adaptor_model_name(tenant)
    variant = model_variant(name, tenant)
    if name != own and not (variant and TENANT_PATTERN.fullmatch(variant)):
        raise ConfigError(
            f"mlflow.registered_model: {name!r} is not a name tenant {tenant!r} may register; "
            f"use {own!r} or {own + '.<variant>'!r} (other names are other tenants' or reserved)"
        )
    return name
