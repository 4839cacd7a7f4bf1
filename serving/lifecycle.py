"""A tenant's adaptor versions in the registry: promotion, catalogue versions, the listing.

    unisrec promote --tenant crafts               # candidate -> production, if the gate agrees
    unisrec promote --tenant crafts --force       # ... even if its valid metric is worse
    unisrec promote --tenant crafts --version 1   # rollback: promote the earlier version
    unisrec catalogue add --tenant crafts new.csv # production + new items -> new production
    unisrec models list

A fine-tune registers its version with the alias ``candidate``; :func:`promote` moves
``production`` (what ``unisrec serve`` serves) when the promotion gate (serving/gate.py) lets
the version through, and tags the promoted version with who, when, which version it replaced
and the gate's numbers. :func:`add_catalogue_version` registers a new version with the same
weights and a longer catalogue, tagged with the version it extends. :func:`run_valid_metrics`
and :func:`run_data_dir` read a version's lineage back from its fine-tune run. Tag names:
``unisrec/tags.py``; their meaning: docs/data-format.md, "Registry tags".

On a tracking server with users, reading needs READ on the tenant's registered model and
:func:`promote` and :func:`add_catalogue_version` need EDIT; they check before they change
anything, and a refusal is one AccessDenied line (unisrec/access.py).
"""

from __future__ import annotations

import getpass
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from serving.gate import (
    DEFAULT_METRIC,
    DEFAULT_TOLERANCE,
    Contender,
    PromotionRefused,
    check_gate_options,
    promotion_decision,
)
from unisrec import access
from unisrec import tags as T
from unisrec.errors import ConfigError


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        with access.needs("READ", access.REGISTERED_MODEL, name):
            return str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _versions(name: str, permission: str = "READ") -> dict[str, object]:
    """``{version: ModelVersion}`` of a registered model; ConfigError if there is none,
    AccessDenied (naming ``permission``, what the caller needs) if the server hides it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    found = {}
    # A sqlite store that does not exist holds nothing: a client would create it.
    if not _missing_sqlite_store(uri):
        client = _client()
        try:
            with access.needs(permission, access.REGISTERED_MODEL, name):
                client.get_registered_model(name)  # a search would hide a refusal as "none"
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        found = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    if not found:
        raise ConfigError(
            f"--tenant: no registered model {name!r} in {uri} (fine-tune the "
            "tenant first: unisrec finetune CONFIG.yaml tenant=NAME, or point --tracking-uri "
            "or MLFLOW_TRACKING_URI at the store that has it)"
        )
    return found


def _missing_sqlite_store(uri: str) -> bool:
    """True for a ``sqlite:///PATH`` tracking URI whose database file does not exist."""
    from unisrec.tracking import sqlite_path

    path = sqlite_path(uri)
    return path is not None and not path.exists()


def tenant_versions(tenant: str) -> list[str]:
    """The tenant's registered adaptor versions, oldest first; ConfigError naming the
    tracking store when it has none."""
    return sorted(_versions(T.adaptor_model_name(tenant)), key=int)


def promote(
    tenant: str,
    version: str | None = None,
    by: str | None = None,
    *,
    metric: str = DEFAULT_METRIC,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
    gated: bool = True,
) -> dict[str, str]:
    """Point ``production`` of the tenant's adaptor at ``version`` (default: the
    ``candidate``) if the promotion gate lets it (serving/gate.py: its valid ``metric`` at
    most ``tolerance`` below production's), else raise PromotionRefused naming both numbers;
    ``force`` promotes anyway and tags who forced it. ``gated=False`` skips the comparison
    (a catalogue version: the weights of the production version it extends).

    Tags the version with who, when, the production version it replaced and the gate's
    numbers. Promoting an earlier production version is a rollback. Returns model, version,
    previous and the gate's one line."""
    name = T.adaptor_model_name(tenant)
    versions = _versions(name, "EDIT")
    access.require("EDIT", access.REGISTERED_MODEL, name)
    label = f"version {version}"
    if version is None:
        version = alias_version(name, T.CANDIDATE)
        label = f"{T.CANDIDATE} version {version}"
        if version is None:
            raise ConfigError(
                f"--version: {name} has no {T.CANDIDATE!r} version; name one of "
                f"{sorted(versions, key=int)}"
            )
    version = str(version)
    if version not in versions:
        raise ConfigError(
            f"--version: {name} has no version {version} (it has {sorted(versions, key=int)})"
        )
    previous = alias_version(name, T.PRODUCTION) or "none"
    who = by or _who()
    stamp: dict[str, str | None] = {
        T.PROMOTED_BY: who,
        T.PROMOTED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
        T.PROMOTED_FROM: previous,
    }
    gate = "not gated"
    if gated:
        check_gate_options(metric, tolerance)
        challenger = _contender(versions[version], label)
        champion = (
            _contender(versions[previous], f"{T.PRODUCTION} version {previous}")
            if previous in versions
            else None
        )
        decision = promotion_decision(champion, challenger, metric, tolerance)
        if not decision.promote and not force:
            raise PromotionRefused(
                f"{name} not promoted: {decision.reason}; --force promotes it anyway"
            )
        gate = decision.reason if decision.promote else f"forced by {who}: {decision.reason}"
        stamp |= {
            T.GATE_METRIC: metric,
            T.GATE_VALUE: _number(challenger.metrics.get(metric)),
            T.GATE_PRODUCTION_VALUE: _number(champion.metrics.get(metric) if champion else None),
            T.GATE_TOLERANCE: f"{tolerance:g}",
            T.GATE_DECISION: gate,
            T.FORCED_BY: None if decision.promote else who,
        }
    _set_tags(name, version, stamp)
    _client().set_registered_model_alias(name, T.PRODUCTION, version)
    return {"model": name, "version": version, "previous": previous, "gate": gate}


def _contender(mv, label: str) -> Contender:
    """A registered version as the gate sees it: its source run's valid metrics."""
    return Contender(
        label=label,
        metrics=run_valid_metrics(mv.run_id) if mv.run_id else {},
        was_production=T.PROMOTED_AT in mv.tags,
    )


def run_valid_metrics(run_id: str) -> dict[str, float]:
    """A fine-tune run's best validation metrics, named as the gate names them
    (``best_valid_ndcg_at_10`` -> ``ndcg@10``)."""
    prefix = T.VALID_METRIC_PREFIX
    with access.needs("READ", "the experiment of run", run_id):
        metrics = _client().get_run(run_id).data.metrics
    return {
        key[len(prefix) :].replace("_at_", "@"): value
        for key, value in metrics.items()
        if key.startswith(prefix)
    }


def run_data_dir(run_id: str) -> str | None:
    """The dataset directory a fine-tune run read (its ``data.dir`` param), if it names one."""
    with access.needs("READ", "the experiment of run", run_id):
        return _client().get_run(run_id).data.params.get(T.DATA_DIR_PARAM) or None


def _set_tags(name: str, version: str, stamp: dict[str, str | None]) -> None:
    """Set each tag of ``stamp`` on the version; a None value removes the tag if present."""
    client = _client()
    present = client.get_model_version(name, version).tags
    for key, value in stamp.items():
        if value is not None:
            client.set_model_version_tag(name, version, key, value)
        elif key in present:
            client.delete_model_version_tag(name, version, key)


def _number(value: float | None) -> str:
    return "none" if value is None else repr(float(value))


def _who() -> str:
    """Who promotes: the tracking server's user when there is one, else the OS user."""
    user = access.tracking_user()
    return getpass.getuser() if user == "anonymous" else user


def add_catalogue_version(
    tenant: str,
    csv_path: str | Path,
    version: str | None = None,
    encode: Callable[[list[str], dict], np.ndarray] | None = None,
) -> dict[str, str | int]:
    """Register a new version of the tenant's adaptor: the weights and backbone of
    ``version`` (default: ``production``) with the items of ``csv_path`` (columns item, text)
    appended to its catalogue, their text encoded with the catalogue's encoder (or
    ``encode(texts, encoder) -> (M, D)``).

    The new version is logged to the run of the version it extends (same training, same
    metrics) and tagged ``unisrec.extends_version``. It takes over ``production`` when it
    extends the production version (no retraining, nothing to re-evaluate), else it becomes
    the ``candidate``.
    """
    from adaptors.bundle import read_spec
    from adaptors.catalogue import Catalogue
    from adaptors.publish import load_adaptor, register_adaptor
    from serving.new_items import encode_with_dataset_encoder, read_items_csv
    from unisrec.errors import DataError

    name = T.adaptor_model_name(tenant)
    versions = _versions(name, "EDIT")
    access.require("EDIT", access.REGISTERED_MODEL, name)
    production = alias_version(name, T.PRODUCTION)
    base = str(version) if version is not None else production
    if base is None:
        raise ConfigError(
            f"--version: {name} has no {T.PRODUCTION!r} version to extend; "
            f"promote one (unisrec promote --tenant {tenant}) or name one of "
            f"{sorted(versions, key=int)}"
        )
    if base not in versions:
        raise ConfigError(f"--version: {name} has no version {base}")
    keys, texts = read_items_csv(csv_path)
    recommender = load_adaptor(f"models:/{name}/{base}")
    catalogue: Catalogue = recommender.catalogue
    clash = [k for k in keys if k in catalogue]
    if clash:
        raise DataError(
            f"item {clash[0]!r} is already in the catalogue", file=csv_path, field="item"
        )
    vectors = (encode or encode_with_dataset_encoder)(texts, catalogue.encoder)
    extended = catalogue.with_items(keys, texts, vectors)
    paths = recommender.artifact_paths
    spec = read_spec(Path(paths["adaptor"]))
    alias = T.PRODUCTION if base == production else T.CANDIDATE
    with tempfile.TemporaryDirectory() as tmp:
        extended.save(Path(tmp) / "catalogue")
        new_version = register_adaptor(
            run_id=versions[base].run_id,
            name=name,
            alias=T.LATEST,  # aliases are set below, with the promotion record
            bundle_dir=Path(paths["adaptor"]),
            catalogue_dir=Path(tmp) / "catalogue",
            spec=spec,
            backbone_dir=Path(paths["backbone"]) if "backbone" in paths else None,
            extra_tags={T.EXTENDS_VERSION: base, T.ADDED_ITEMS: str(len(keys))},
        )
    if alias == T.PRODUCTION:
        promote(tenant, new_version, gated=False)
    else:
        _client().set_registered_model_alias(name, T.CANDIDATE, new_version)
    return {
        "model": name,
        "version": new_version,
        "extends": base,
        "alias": alias,
        "added": len(keys),
        "items": len(extended),
    }


# --- the listing ---------------------------------------------------------------------


def model_rows(tenant: str | None = None) -> list[dict[str, str]]:
    """One row per adaptor version (all tenants, or one), newest first within a tenant:
    tenant, model, version, aliases, backbone, data digest, domain, mode, test metrics,
    what it extends, promotion record."""
    client = _client()
    runs: dict[str, dict[str, float]] = {}
    rows = []
    names = (
        [T.adaptor_model_name(tenant)]
        if tenant
        else [
            m.name
            for m in client.search_registered_models()
            if m.tags.get(T.KIND) == "adaptor" or m.name.startswith(T.ADAPTOR_MODEL_PREFIX)
        ]
    )
    for name in sorted(names):
        model = client.get_registered_model(name)
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in sorted(_versions(name).values(), key=lambda v: -int(v.version)):
            tags = mv.tags
            if mv.run_id and mv.run_id not in runs:
                runs[mv.run_id] = client.get_run(mv.run_id).data.metrics
            metrics = runs.get(mv.run_id, {})
            backbone = tags.get(T.BACKBONE_NAME, "none")
            rows.append(
                {
                    "tenant": tags.get(T.TENANT) or model.tags.get(T.TENANT, ""),
                    "model": name,
                    "version": str(mv.version),
                    "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                    "backbone": f"{backbone} v{tags.get(T.BACKBONE_VERSION, '?')}"
                    if backbone != "none"
                    else "none (scratch)",
                    "data_digest": tags.get(T.DATA_DIGEST, "")[:12],
                    "domain": tags.get(T.DOMAIN, ""),
                    "mode": tags.get(T.MODE, ""),
                    "test_ndcg@10": _fmt(metrics.get("test_ndcg_at_10")),
                    "test_recall@10": _fmt(metrics.get("test_recall_at_10")),
                    "extends": tags.get(T.EXTENDS_VERSION, ""),
                    "added_items": tags.get(T.ADDED_ITEMS, ""),
                    "promoted": _promotion(tags),
                }
            )
    return rows


def format_rows(rows: list[dict[str, str]]) -> str:
    """The rows of :func:`model_rows` as a fixed-width table."""
    columns = [
        ("tenant", "tenant"),
        ("version", "v"),
        ("aliases", "aliases"),
        ("backbone", "backbone"),
        ("data_digest", "data"),
        ("domain", "domain"),
        ("mode", "mode"),
        ("test_ndcg@10", "test N@10"),
        ("test_recall@10", "test R@10"),
        ("lineage", "from"),
        ("promoted", "promoted"),
    ]
    table = [
        {
            **r,
            "lineage": f"v{r['extends']} +{r['added_items']} items" if r["extends"] else "finetune",
        }
        for r in rows
    ]
    widths = {k: max([len(h)] + [len(str(r[k])) for r in table]) for k, h in columns}
    lines = ["  ".join(h.ljust(widths[k]) for k, h in columns).rstrip()]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k, _ in columns).rstrip() for r in table]
    return "\n".join(lines)


def _promotion(tags: dict[str, str]) -> str:
    if T.PROMOTED_AT not in tags:
        return ""
    before = tags.get(T.PROMOTED_FROM, "none")
    replaced = f"replaced v{before}" if before != "none" else "first"
    return f"{tags[T.PROMOTED_AT]} by {tags.get(T.PROMOTED_BY, '?')} ({replaced})"


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
