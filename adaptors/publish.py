"""A tenant's adaptor in the MLflow registry: name ownership, registration with lineage, and
the pyfunc that ``mlflow models serve`` runs.

Each tenant registers its own model (``unisrec-adaptor-<tenant>`` by default), tagged
``unisrec.tenant`` on the registered model so one tenant can never overwrite another's.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from adaptors.bundle import AdaptorSpec, load_bundle
from adaptors.catalogue import Catalogue
from adaptors.serving import parse_history, top_k
from unisrec import tags as T
from unisrec.errors import ConfigError


def claim_model_name(name: str, tenant: str) -> None:
    """Refuse to register ``name`` for ``tenant`` when it exists and is not that tenant's.

    A registered model without a ``unisrec.tenant`` tag (a backbone, say) is not ours either.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException:
        return  # does not exist yet
    owner = model.tags.get(T.TENANT)
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

    claim_model_name(name, spec.tenant)
    client = MlflowClient()
    try:
        client.create_registered_model(name, tags={T.TENANT: spec.tenant, T.KIND: "adaptor"})
    except MlflowException:
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
    if alias.lower() != T.LATEST:
        client.set_registered_model_alias(name, alias, version)
    return version


def load_adaptor(uri: str):
    """Load a registered adaptor as its :class:`AdaptorRecommender`
    (``.model``, ``.spec``, ``.catalogue``), backbone pulled by lineage."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(uri).unwrap_python_model()


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
    """A tenant's recommender for ``mlflow models serve``: artifacts ``adaptor`` (a bundle)
    and ``catalogue``. Loading pulls the frozen backbone from the registry by lineage, so the
    serving process needs ``MLFLOW_TRACKING_URI`` (unless the bundle holds the whole model)."""

    def load_context(self, context) -> None:
        self.model, self.spec = load_bundle(Path(context.artifacts["adaptor"]))
        self.catalogue = Catalogue.load(context.artifacts["catalogue"])

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
        )
        return pd.DataFrame(
            {
                "items": [[key for key, _ in row] for row in recs],
                "scores": [[s for _, s in row] for row in recs],
            }
        )
