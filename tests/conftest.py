"""Test-wide setup: every Ray node, gloo group and server a test starts stays on loopback,
and no test's MLflow store leaks into the next test or module."""

import os
import sys

import pytest

from unisrec.runtime import use_loopback

use_loopback()

MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _mlflow_uris() -> dict[str, str | None]:
    return {key: os.environ.get(key) for key in MLFLOW_URI_ENV}


def _restore_mlflow_uris(before: dict[str, str | None]) -> None:
    """``mlflow.set_tracking_uri``/``set_registry_uri`` also export ``MLFLOW_*_URI`` for
    subprocesses; put both (and MLflow's own settings) back as they were."""
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None unsets the variable
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True, scope="module")
def _mlflow_store_stays_with_its_module():
    """Module fixtures point MLflow at their module's store; the next module starts clean."""
    before = _mlflow_uris()
    yield
    _restore_mlflow_uris(before)


@pytest.fixture(autouse=True)
def _mlflow_store_stays_with_its_test():
    before = _mlflow_uris()
    yield
    _restore_mlflow_uris(before)
