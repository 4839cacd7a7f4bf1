"""Fine-tuning under fault and bad-input drills (issue 10).

* a tenant may register only its own model names (``unisrec-adaptor-<tenant>`` and
  ``unisrec-adaptor-<tenant>.<variant>``); another tenant's and the backbone's are refused
  when the config is read, before MLflow is asked anything;
* MLflow down: one short probe, "cannot reach the MLflow tracking server at URL", quickly;
  only RESOURCE_DOES_NOT_EXIST means a model does not exist.
"""

from __future__ import annotations

import pytest

from adaptors.config import FinetuneConfig
from unisrec.config import load_config
from unisrec.errors import ConfigError

# --- model names a tenant may register ----------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "unisrec-adaptor-newco",  # another tenant's default name
        "unisrec-adaptor-evil-co",  # tenant evil-co's default name, not a variant of evil's
        "unisrec-backbone",  # the backbone's
        "unisrec-adaptor-",
        "unisrec-adaptor-evil.",
        "unisrec-adaptor-evil.Bad/Name",
        "anything-else",
    ],
)
def test_a_tenant_cannot_name_a_model_outside_its_own_prefix(name):
    with pytest.raises(ConfigError, match=r"^mlflow\.registered_model: .*tenant 'evil'"):
        load_config(FinetuneConfig, None, ["tenant=evil", f"mlflow.registered_model={name}"])


@pytest.mark.parametrize("name", ["", "unisrec-adaptor-evil", "unisrec-adaptor-evil.v2-beta"])
def test_a_tenant_may_register_its_own_names(name):
    cfg = load_config(FinetuneConfig, None, ["tenant=evil", f"mlflow.registered_model={name}"])
    assert cfg.model_name in ("unisrec-adaptor-evil", name)


def test_the_rule_holds_for_tenants_of_a_multi_tenant_run(tmp_path):
    from adaptors.tenants import tenant_configs

    cfg = load_config(
        FinetuneConfig,
        None,
        [
            f"data.dir={tmp_path}",
            'tenants=[{"name": "evil", "overrides": '
            '{"data.domain": "x", "mlflow.registered_model": "unisrec-adaptor-newco"}}]',
        ],
    )
    with pytest.raises(ConfigError, match="mlflow.registered_model"):
        tenant_configs(cfg)


def test_cli_refuses_the_name_before_touching_mlflow(tmp_path, monkeypatch, capsys):
    from recipes.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "finetune.yaml"
    config.write_text("tenant: evil\ndata: {domain: office}\n")
    code = main(["finetune", str(config), "mlflow.registered_model=unisrec-adaptor-newco"])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: mlflow.registered_model:")
    assert not (tmp_path / "mlflow.db").exists()


# --- MLflow down ----------------------------------------------------------------------------


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again: nothing listens there


def test_finetune_with_the_tracking_server_down_fails_fast_with_one_error_line(tmp_path):
    """Before: claim_model_name took MLflow's connection error (after ~8 minutes of
    retries) as "no such model" and the run failed later with another message."""
    import os
    import subprocess
    import sys
    import time

    url = f"http://127.0.0.1:{_closed_port()}"
    config = tmp_path / "finetune.yaml"
    config.write_text(f"tenant: acme\ndata: {{domain: office, dir: {tmp_path}}}\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "recipes.cli", "finetune", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert time.monotonic() - started < 60
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot reach the MLflow tracking server at {url}"), last
    assert "Traceback" not in done.stderr


def test_only_resource_does_not_exist_means_the_model_is_free(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from adaptors.publish import claim_model_name

    monkeypatch.setattr(MlflowClient, "__init__", lambda self, *args, **kwargs: None)  # no store

    from mlflow.protos import databricks_pb2

    def answer(code):
        def get_registered_model(self, name):
            raise MlflowException(f"answer {code}", error_code=getattr(databricks_pb2, code))

        monkeypatch.setattr(MlflowClient, "get_registered_model", get_registered_model)

    answer("RESOURCE_DOES_NOT_EXIST")
    claim_model_name("unisrec-adaptor-acme", "acme")  # free
    for code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE"):
        answer(code)
        with pytest.raises(MlflowException, match=code):
            claim_model_name("unisrec-adaptor-acme", "acme")
    # A tracking server with users: the refusal names the permission the claim is for.
    from unisrec.access import AccessDenied

    answer("PERMISSION_DENIED")
    with pytest.raises(AccessDenied, match="lacks EDIT on registered model 'unisrec-adaptor-acme'"):
        claim_model_name("unisrec-adaptor-acme", "acme")
