"""A tenant's adaptor in the MLflow registry: name ownership, registration with lineage, and
the pyfunc that ``mlflow models serve`` runs.

Each tenant registers its own model (``unisrec-adaptor-<tenant>`` by default), tagged
``unisrec.tenant`` on the registered model so one tenant can never overwrite another's.

A registered adaptor is self-contained. Its pyfunc carries

* artifacts ``adaptor`` (the bundle), ``catalogue`` and ``backbone`` (the frozen backbone's
  weights, resolved from the registry when the adaptor is logged; absent when the bundle
  holds the whole model),
* the code it runs (``code_paths``: the ``unisrec``, ``pretrain`` and ``adaptors`` packages),
* pinned requirements of what that code imports (:data:`SERVING_REQUIREMENTS`),

so it loads and predicts in a fresh process with no tracking server and no installed
``unisrec``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from adaptors.bundle import AdaptorSpec, load_bundle, write_backbone
from adaptors.catalogue import Catalogue
from adaptors.topk import catalogue_item_vectors, parse_history, top_k
from unisrec import tags as T
from unisrec.errors import ConfigError
from unisrec.runtime import library_output

# Distributions the pyfunc's code imports when it loads and predicts (pinned at log time).
SERVING_REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "pyyaml", "mlflow")
ARTIFACT_PATH = "adaptor"  # the model's name inside its run


def claim_model_name(name: str, tenant: str) -> None:
    """Refuse to register ``name`` for ``tenant`` when it exists and is not that tenant's, or
    when the tracking server does not let this user register versions of it (EDIT).

    A registered model without a ``unisrec.tenant`` tag (a backbone, say) is not ours either.
    A server with users hides the models a user may not read, so there a name nobody granted
    this user is refused although it may not exist: an admin creates tenants' models
    (``unisrec tenants add``, ``unisrec tenants add-variant``).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from unisrec import access

    variant = T.model_variant(name, tenant)
    hint = (
        f"the admin creates it: unisrec tenants add-variant {tenant} {variant}" if variant else ""
    )
    try:
        with access.needs("EDIT", access.REGISTERED_MODEL, name, hint):
            model = MlflowClient().get_registered_model(name)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return  # does not exist yet
        raise  # the registry did not answer the question (down, ...)
    owner = model.tags.get(T.TENANT)
    if owner != tenant:
        raise ConfigError(
            f"mlflow.registered_model: {name!r} already exists and belongs to "
            f"{'tenant ' + repr(owner) if owner else 'no tenant'}; refusing to register tenant {tenant!r} over it"
        )
    access.require("EDIT", access.REGISTERED_MODEL, name)


def register_adaptor(
    *,
    run_id: str,
    name: str,
    alias: str,
    bundle_dir: Path,
    catalogue_dir: Path,
    spec: AdaptorSpec,
    backbone_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log the bundle, catalogue and backbone as a self-contained pyfunc model to ``run_id``,
    register it as ``name`` with lineage tags (+ ``extra_tags``), point ``alias`` at it.

    ``backbone_dir`` (a :func:`~adaptors.bundle.write_backbone` directory) is read from the
    registry by the spec's lineage when not given. Returns the new version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    import adaptors
    import pretrain
    import unisrec
    from unisrec.tracking import pinned_requirements

    claim_model_name(name, spec.tenant)
    client = MlflowClient()
    try:
        client.create_registered_model(name, tags={T.TENANT: spec.tenant, T.KIND: "adaptor"})
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        claim_model_name(name, spec.tenant)  # created meanwhile: still ours?
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"adaptor": str(bundle_dir), "catalogue": str(catalogue_dir)}
        if not spec.trains_everything:
            if backbone_dir is None:
                from pretrain.registry import load_backbone

                backbone_dir = write_backbone(
                    Path(tmp) / "backbone", load_backbone(spec.backbone_uri)
                )
            artifacts["backbone"] = str(backbone_dir)
        # The run's own experiment, not this process's active one: each tenant's runs have
        # an experiment of their own, and MLflow refuses to reopen a run of another.
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id), library_output():  # MLflow prints registrations
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_PATH,
                python_model=AdaptorRecommender(),
                artifacts=artifacts,
                code_paths=[str(Path(m.__file__).parent) for m in (unisrec, pretrain, adaptors)],
                signature=pyfunc_signature(),
                pip_requirements=pinned_requirements(SERVING_REQUIREMENTS),
                registered_model_name=name,
                await_registration_for=60,
            )
    version = str(info.registered_model_version)
    for key, value in {**spec.lineage_tags(), **(extra_tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    if alias.lower() != T.LATEST:
        client.set_registered_model_alias(name, alias, version)
    return version


def load_adaptor(uri: str):
    """Load a registered adaptor (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``) as its
    :class:`AdaptorRecommender` (``.model``, ``.spec``, ``.catalogue``, ``.artifact_paths``).

    On a tracking server with users this needs READ on the registered model and on the
    experiment of the run that logged it (its files); a refusal is AccessDenied naming which.
    """
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from unisrec import access

    if not uri.startswith("models:/"):
        return mlflow.pyfunc.load_model(uri).unwrap_python_model()
    name, _, alias = uri[len("models:/") :].partition("@")
    name, _, number = name.partition("/")
    client = MlflowClient()
    with access.needs("READ", access.REGISTERED_MODEL, name):
        version = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, number)
        )
    with access.needs(
        "READ",
        "the experiment of run",
        version.run_id or "?",
        f"it holds the files of {name} version {version.version}",
    ):
        return mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model()


def pyfunc_signature():
    """Input: a ``history`` column (list of item keys or a separated string); params ``k``
    and ``exclude_history``; output: ``items`` and ``scores`` lists per row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), "history")]),
        params=ParamSchema(
            [ParamSpec("k", "long", 10), ParamSpec("exclude_history", "boolean", True)]
        ),
    )


class AdaptorRecommender(mlflow.pyfunc.PythonModel):
    """A tenant's recommender for ``mlflow models serve``: artifacts ``adaptor`` (a bundle),
    ``catalogue`` and ``backbone``. Adaptors logged before the backbone travelled with them
    pull it from the registry by lineage (and need ``MLFLOW_TRACKING_URI``)."""

    def load_context(self, context) -> None:
        self.artifact_paths = {k: str(v) for k, v in context.artifacts.items()}
        backbone = self.artifact_paths.get("backbone")
        self.model, self.spec = load_bundle(
            Path(self.artifact_paths["adaptor"]), Path(backbone) if backbone else None
        )
        self.catalogue = Catalogue.load(self.artifact_paths["catalogue"])
        # (C+1, H): the adaptor runs over the catalogue once, not on every request.
        self.item_vectors = catalogue_item_vectors(self.model, self.spec, self.catalogue)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        params = params or {}
        recs = top_k(
            self.model,
            self.spec,
            self.catalogue,
            [parse_history(h) for h in model_input["history"]],
            k=int(params.get("k", 10)),
            exclude_history=bool(params.get("exclude_history", True)),
            item_vectors=self.item_vectors,
        )
        return pd.DataFrame(
            {
                "items": [[key for key, _ in row] for row in recs],
                "scores": [[s for _, s in row] for row in recs],
            }
        )
