"""Tenants walled off in the registry: a real ``mlflow server`` with users (MLflow's basic-auth
app, ``unisrec mlflow-server --auth``) on 127.0.0.1, driven over HTTP as its admin, two
tenants, a read-only serving user and nobody.

One module-scoped server: a tiny randomly initialised backbone registered by the admin as
pretraining would, tenants ``acme`` and ``globex`` and reader ``serving`` added with
``unisrec tenants``, and globex's adaptor fine-tuned with globex's credentials. Tests run in
file order: acme fine-tunes and promotes in the middle, and the serving tests read that.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import requests
import torch
from helpers_auth import as_user as calling_as
from helpers_auth import one_error_line, refused, unisrec_as
from helpers_data import write_small_dataset
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from mlflow.tracking import MlflowClient

from adaptors.catalogue import Catalogue
from adaptors.config import FinetuneConfig
from adaptors.finetune import run_finetune
from adaptors.topk import top_k
from cluster.accounts import add_reader, add_tenant, connect
from cluster.mlflow_server import (
    ADMIN_PASSWORD_ENV,
    AuthSettings,
    ensure_admin,
    start_server,
    stop_server,
    write_auth_config,
)
from pretrain.model import BackboneConfig, UniSRec
from pretrain.registry import register_backbone
from unisrec import tags as T
from unisrec.access import refusal_message, refusal_status
from unisrec.config import from_dict
from unisrec.runtime import free_port
from unisrec.tracking import set_experiment

pytestmark = pytest.mark.slow

PASSWORDS = {
    "admin": "admin-password-0001",
    "acme": "acme-password-0001",
    "globex": "globex-password-0001",
    "serving": "serving-password-0001",
}
TINY = {"hidden_size": 16, "inner_size": 32, "num_experts": 2, "max_seq_len": 10}
ACME_MODEL = T.adaptor_model_name("acme")
GLOBEX_MODEL = T.adaptor_model_name("globex")


def as_user(user: str | None):
    """MLflow's client in this process (and what it starts) calls as ``user`` (None: nobody)."""
    return calling_as(user, PASSWORDS.get(user or ""))


def unisrec(args: list[str], user: str | None, url: str, **env) -> subprocess.CompletedProcess:
    """``unisrec ARGS`` in a fresh process as ``user`` against the server at ``url``."""
    return unisrec_as(args, url, user, PASSWORDS.get(user or ""), **env)


def finetune_config(platform: dict, tenant: str, **mlflow_settings) -> dict:
    return {
        "tenant": tenant,
        "data": {"dir": str(platform["data"]), "domain": tenant},
        "backbone": f"models:/{T.BACKBONE_MODEL}@current",
        "optim": {"max_epochs": 1, "batch_size": 16, "lr": 1e-2},
        "mlflow": {"tracking_uri": platform["url"], **mlflow_settings},
        "output_root": str(platform["root"] / "runs"),
    }


def register_tiny_backbone(name: str) -> None:
    set_experiment("unisrec-pretrain")
    with mlflow.start_run() as run:
        pass
    register_backbone(
        UniSRec(from_dict(BackboneConfig, TINY), text_dim=8),
        run_id=run.info.run_id,
        name=name,
        alias="current",
        data_digest="pretrain-digest",
        encoder="test-encoder",
        encoder_dim=8,
        config_hash="0" * 16,
    )


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tenants")
    server = start_server(root / "mlflow", auth=AuthSettings(admin_password=PASSWORDS["admin"]))
    uri_before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    mlflow.set_tracking_uri(server.url)
    mlflow.set_registry_uri(server.url)
    try:
        torch.manual_seed(0)
        with as_user("admin"):
            register_tiny_backbone(T.BACKBONE_MODEL)
            admin = connect(server.url)
            for tenant in ("acme", "globex"):
                add_tenant(admin, tenant, PASSWORDS[tenant])
            add_reader(admin, "serving", PASSWORDS["serving"])
        data = write_small_dataset(
            root / "data", domains=("acme", "globex"), item_key="{domain}-i{i:04d}"
        )
        out = {"root": root, "url": server.url, "data": data, "server": server}
        with as_user("globex"):
            out["globex"] = run_finetune(
                from_dict(FinetuneConfig, finetune_config(out, "globex")), progress=False
            )
        yield out
    finally:
        stop_server(server)
        if uri_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = uri_before


def admin_view(url: str) -> dict:
    """Every run and model version the server holds, as the admin sees them."""
    with as_user("admin"):
        client = MlflowClient(url, registry_uri=url)
        experiments = client.search_experiments()
        runs = client.search_runs([e.experiment_id for e in experiments])
        versions = {
            m.name: sorted(v.version for v in client.search_model_versions(f"name='{m.name}'"))
            for m in client.search_registered_models()
        }
        models = {
            m.name: (dict(m.tags), dict(m.aliases or {})) for m in client.search_registered_models()
        }
    return {
        "runs": sorted(r.info.run_id for r in runs),
        "versions": versions,
        "models": models,
    }


# --- the server -----------------------------------------------------------------------------


def test_the_server_refuses_to_start_without_the_admin_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != ADMIN_PASSWORD_ENV}
    for password in (None, "short", "password1234"):
        if password is not None:
            env[ADMIN_PASSWORD_ENV] = password
        result = subprocess.run(
            [sys.executable, "-m", "recipes.cli", "mlflow-server", "--auth",
             "--root", str(tmp_path / "mlflow"), "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        line = one_error_line(result)
        assert ADMIN_PASSWORD_ENV in line, line
        assert not (tmp_path / "mlflow").exists()  # nothing started, nothing written


def test_the_admin_gets_the_environments_password_on_every_start(tmp_path):
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    config = write_auth_config(tmp_path, AuthSettings(admin_password="first-password-01"))
    text = config.read_text()
    assert "default_permission = NO_PERMISSIONS" in text
    assert "first-password-01" not in text and "admin_password" not in text
    assert config.stat().st_mode & 0o077 == 0 and config.parent.stat().st_mode & 0o077 == 0
    assert ensure_admin(config, AuthSettings(admin_password="first-password-01")) == "created"
    assert ensure_admin(config, AuthSettings(admin_password="second-password-02")) == "updated"
    store = SqlAlchemyStore()
    store.init_db(f"sqlite:///{tmp_path / 'auth' / 'basic_auth.db'}")
    assert store.authenticate_user("admin", "second-password-02")
    assert not store.authenticate_user("admin", "first-password-01")
    assert store.get_user("admin").is_admin


def test_nobody_gets_anything_without_a_user(platform):
    url = platform["url"]
    for route, params in (
        ("/api/2.0/mlflow/registered-models/search", {}),
        ("/api/2.0/mlflow/registered-models/get", {"name": GLOBEX_MODEL}),
        ("/api/2.0/mlflow/experiments/search", {"max_results": 10}),
        ("/api/2.0/mlflow/runs/get", {"run_id": platform["globex"]["run_id"]}),
        ("/api/2.0/mlflow-artifacts/artifacts", {"path": "1"}),
    ):
        for auth in (None, ("acme", "not-acme-password")):
            answer = requests.get(url + route, params=params, auth=auth, timeout=60)
            assert answer.status_code == 401, (route, auth, answer.text[:200])
    line = one_error_line(unisrec(["models", "list"], None, url))
    assert (
        line
        == f"error: the tracking server at {url} needs a user: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )


def test_a_refusal_no_job_named_is_still_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "acme")
    rest = MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200. "
        "Response body: 'Permission denied'",
        error_code=databricks_pb2.PERMISSION_DENIED,
    )
    assert refusal_message(rest).startswith(
        "user 'acme' lacks a permission the tracking server requires for "
        "/api/2.0/mlflow/runs/create (HTTP 403)"
    )
    response = requests.Response()
    response.status_code, response.url = (
        403,
        "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts?path=1",
    )
    download = requests.HTTPError("403 Client Error: Forbidden", response=response)
    assert "requires for /api/2.0/mlflow-artifacts/artifacts (HTTP 403)" in refusal_message(
        download
    )
    assert refusal_message(ValueError("no")) is None


# --- tenants ----------------------------------------------------------------------------------


def test_a_tenant_cannot_version_alias_tag_or_delete_another_tenants_model(platform):
    url = platform["url"]
    before = admin_view(url)
    with as_user("acme"):
        client = MlflowClient(url, registry_uri=url)
        assert refused(lambda: client.get_registered_model(GLOBEX_MODEL)) == "PERMISSION_DENIED"
        assert client.search_model_versions(f"name='{GLOBEX_MODEL}'") == []  # hidden
        for call in (
            lambda: client.set_registered_model_alias(GLOBEX_MODEL, "production", "1"),
            lambda: client.set_model_version_tag(GLOBEX_MODEL, "1", "x", "y"),
            lambda: client.set_registered_model_tag(GLOBEX_MODEL, T.TENANT, "acme"),
            lambda: client.create_model_version(GLOBEX_MODEL, "models:/m-0", run_id=None),
            lambda: client.delete_model_version(GLOBEX_MODEL, "1"),
            lambda: client.delete_registered_model(GLOBEX_MODEL),
            lambda: client.rename_registered_model(GLOBEX_MODEL, "unisrec-adaptor-acme2"),
        ):
            assert refused(call) == "PERMISSION_DENIED"
        # Its own model: versions and aliases, but not deleting (EDIT, not MANAGE).
        assert client.get_registered_model(ACME_MODEL).tags[T.TENANT] == "acme"
        assert refused(lambda: client.delete_registered_model(ACME_MODEL)) == "PERMISSION_DENIED"
    assert admin_view(url) == before


def test_a_tenant_reads_the_backbone_but_cannot_change_it(platform):
    url = platform["url"]
    before = admin_view(url)
    with as_user("acme"):
        client = MlflowClient(url, registry_uri=url)
        version = client.get_model_version_by_alias(T.BACKBONE_MODEL, "current")
        assert version.tags[T.ENCODER] == "test-encoder"
        for call in (
            lambda: client.set_registered_model_alias(T.BACKBONE_MODEL, "current", "1"),
            lambda: client.delete_registered_model_alias(T.BACKBONE_MODEL, "current"),
            lambda: client.set_model_version_tag(T.BACKBONE_MODEL, "1", T.ENCODER, "other"),
            lambda: client.create_model_version(T.BACKBONE_MODEL, version.source),
            lambda: client.delete_model_version(T.BACKBONE_MODEL, "1"),
            lambda: client.delete_registered_model(T.BACKBONE_MODEL),
            lambda: client.create_run(client.get_run(version.run_id).info.experiment_id),
        ):
            assert refused(call) == "PERMISSION_DENIED"
    assert admin_view(url) == before


def test_a_tenant_cannot_read_another_tenants_runs(platform):
    url = platform["url"]
    run_id = platform["globex"]["run_id"]
    with as_user("admin"):
        globex_experiment = MlflowClient(url).get_run(run_id).info.experiment_id
    with as_user("acme"):
        client = MlflowClient(url)
        assert refused(lambda: client.get_run(run_id)) == "PERMISSION_DENIED"
        assert (
            refused(lambda: client.get_metric_history(run_id, "best_epoch")) == "PERMISSION_DENIED"
        )
        name = T.finetune_experiment_name("globex")
        assert refused(lambda: client.get_experiment_by_name(name)) == "PERMISSION_DENIED"
        visible = {e.name for e in client.search_experiments()}
        assert name not in visible and T.finetune_experiment_name("acme") in visible
        try:
            assert client.search_runs([globex_experiment]) == []
        except MlflowException as err:
            assert err.error_code == "PERMISSION_DENIED"
        with pytest.raises(Exception) as caught:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="metrics.json")
        assert refusal_status(caught.value) == 403


def test_refused_jobs_end_with_one_error_line_and_change_nothing(platform, tmp_path):
    url = platform["url"]
    before = admin_view(url)
    line = one_error_line(unisrec(["promote", "--tenant", "globex"], "acme", url))
    assert line == f"error: user 'acme' lacks EDIT on registered model '{GLOBEX_MODEL}'"

    # A fine-tune of globex's adaptor with acme's credentials stops before it trains.
    config = tmp_path / "globex.yaml"
    config.write_text(json.dumps(finetune_config(platform, "globex")))
    line = one_error_line(unisrec(["finetune", str(config), "-q"], "acme", url))
    assert line == f"error: user 'acme' lacks EDIT on registered model '{GLOBEX_MODEL}'"
    # ... and one of acme's own into globex's experiment too.
    config.write_text(
        json.dumps(
            finetune_config(platform, "acme", experiment=T.finetune_experiment_name("globex"))
        )
    )
    line = one_error_line(unisrec(["finetune", str(config), "-q"], "acme", url))
    assert line == "error: user 'acme' lacks EDIT on experiment 'unisrec-finetune-globex'"
    assert not (platform["root"] / "runs" / "acme").exists()  # nothing trained or written
    assert admin_view(url) == before  # no run, no version, no tag, no alias


def test_a_tenant_finetunes_and_promotes_its_own_adaptor(platform):
    url = platform["url"]
    with as_user("acme"):
        summary = run_finetune(
            from_dict(FinetuneConfig, finetune_config(platform, "acme")), progress=False
        )
    platform["acme"] = summary
    assert summary["model_name"] == ACME_MODEL and summary["model_version"] == "1"
    result = unisrec(["promote", "--tenant", "acme"], "acme", url)
    assert result.returncode == 0, result.stderr[-3000:]
    with as_user("admin"):
        client = MlflowClient(url, registry_uri=url)
        model = client.get_registered_model(ACME_MODEL)
        assert model.aliases == {T.CANDIDATE: "1", T.PRODUCTION: "1"}
        assert client.get_model_version(ACME_MODEL, "1").tags[T.PROMOTED_BY]
        run = client.get_run(summary["run_id"])
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == T.finetune_experiment_name("acme")


def test_a_tenants_second_model_is_made_by_the_admin_and_edited_by_the_tenant_alone(
    platform, tmp_path
):
    url = platform["url"]
    variant = f"{ACME_MODEL}.full"
    config = tmp_path / "acme-full.yaml"
    settings = finetune_config(platform, "acme", registered_model=variant)
    config.write_text(json.dumps({**settings, "output_root": str(tmp_path / "runs")}))
    # The tenant cannot make it: the server hides from it a model nobody granted it.
    before = admin_view(url)
    line = one_error_line(unisrec(["finetune", str(config), "-q"], "acme", url))
    assert line == (
        f"error: user 'acme' lacks EDIT on registered model '{variant}' "
        "(the admin creates it: unisrec tenants add-variant acme full)"
    )
    assert admin_view(url) == before
    # Another tenant takes the name first (MLflow lets it); the admin takes it back.
    with as_user("globex"):
        MlflowClient(url, registry_uri=url).create_registered_model(
            variant, tags={T.TENANT: "acme"}
        )
    result = unisrec(["tenants", "add-variant", "acme", "full"], "admin", url)
    assert result.returncode == 0, result.stderr[-3000:]
    added = json.loads(result.stdout)
    assert added["model"] == f"{variant} (exists)" and added["revoked"] == ["globex:MANAGE"]
    assert variant in added["adaptors"]

    result = unisrec(["finetune", str(config), "-q"], "acme", url)
    assert result.returncode == 0, result.stderr[-3000:]
    with as_user("admin"):
        client = MlflowClient(url, registry_uri=url)
        assert [v.version for v in client.search_model_versions(f"name='{variant}'")] == ["1"]
    with as_user("globex"):
        client = MlflowClient(url, registry_uri=url)
        assert refused(lambda: client.get_registered_model(variant)) == "PERMISSION_DENIED"
    with as_user("serving"):
        assert MlflowClient(url, registry_uri=url).get_registered_model(variant).name == variant

    line = one_error_line(unisrec(["tenants", "add-variant", "nobody", "full"], "admin", url))
    assert line.startswith("error: tenants add-variant: there is no user 'nobody'"), line
    line = one_error_line(unisrec(["tenants", "add-variant", "acme", "Full!"], "admin", url))
    assert "'Full!' is not a valid variant" in line, line


# --- the read-only serving user --------------------------------------------------------------


def local_top_k(summary: dict, history: list[str], k: int) -> list[str]:
    from adaptors.bundle import load_bundle

    out = Path(summary["output_dir"])
    with as_user("serving"):  # the backbone comes from the registry
        model, spec = load_bundle(out / "adaptor")
    return [
        key for key, _ in top_k(model, spec, Catalogue.load(out / "catalogue"), [history], k=k)[0]
    ]


def test_the_reader_loads_production_adaptors_but_cannot_change_them(platform):
    from adaptors.publish import load_adaptor
    from serving.endpoint import EndpointConfig, check_tenants

    url = platform["url"]
    history = ["acme-i0004", "acme-i0005"]
    with as_user("serving"):
        # What the endpoint does: resolve production, load that version.
        versions = check_tenants(EndpointConfig(tenants=["acme"], tracking_uri=url))
        assert versions == {"acme": "1"}
        recommender = load_adaptor(f"models:/{ACME_MODEL}/{versions['acme']}")
        recs = top_k(recommender.model, recommender.spec, recommender.catalogue, [history], k=5)[0]
    assert [key for key, _ in recs] == local_top_k(platform["acme"], history, 5)

    before = admin_view(url)
    line = one_error_line(unisrec(["promote", "--tenant", "acme"], "serving", url))
    assert (
        line == f"error: user 'serving' lacks EDIT on registered model '{ACME_MODEL}' (it has READ)"
    )
    assert admin_view(url) == before
    result = unisrec(
        ["recommend", "--tenant", "acme", "--history", ",".join(history), "-k", "5"],
        "serving", url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line.split()[2] for line in result.stdout.splitlines()]
    assert printed == [key for key, _ in recs]


def test_a_name_taken_before_the_tenant_was_added_is_taken_back(platform):
    url = platform["url"]
    squatted = T.adaptor_model_name("initech")
    with as_user("acme"):  # MLflow lets any user create a registered model
        MlflowClient(url, registry_uri=url).create_registered_model(
            squatted, tags={T.TENANT: "initech"}
        )
    result = unisrec(["tenants", "add", "initech", "--password-file", str(write_password(platform, "initech"))], "admin", url)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["revoked"] == ["acme:MANAGE"]
    with as_user("acme"):
        client = MlflowClient(url, registry_uri=url)
        assert refused(lambda: client.get_registered_model(squatted)) == "PERMISSION_DENIED"
    # A name taken without the tenant's tag is refused, not adopted.
    with as_user("acme"):
        MlflowClient(url, registry_uri=url).create_registered_model(T.adaptor_model_name("hooli"))
    line = one_error_line(
        unisrec(
            ["tenants", "add", "hooli", "--password-file", str(write_password(platform, "hooli"))],
            "admin",
            url,
        )  # fmt: skip
    )
    assert "already exists and is tagged for no tenant" in line


def write_password(platform: dict, user: str) -> Path:
    path = platform["root"] / f"{user}.pw"
    path.write_text(f"{user}-password-0001\n")
    return path


def test_tenants_list_and_sync(platform):
    url = platform["url"]
    result = unisrec(["tenants", "list", "--json"], "admin", url)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    acme = {(r["permission"], r["on"], r["via"]) for r in rows if r["user"] == "acme"}
    assert ("EDIT", f"registered model {ACME_MODEL}", "own") in acme
    assert ("EDIT", "experiment unisrec-finetune-acme", "own") in acme
    assert ("READ", f"registered model {T.BACKBONE_MODEL}", "unisrec-tenants") in acme
    assert not any("globex" in on for _, on, _ in acme)
    serving = {(r["kind"], r["permission"], r["on"]) for r in rows if r["user"] == "serving"}
    assert ("reader", "READ", f"registered model {GLOBEX_MODEL}") in serving
    assert {p for _, p, _ in serving} == {"READ"}
    table = unisrec(["tenants", "list"], "admin", url).stdout
    assert re.search(r"^admin\s+admin\s+\(all\)", table, re.M), table
    line = one_error_line(unisrec(["tenants", "list"], "acme", url))
    assert "user 'acme' is not an admin" in line

    # A backbone registered after the tenants were added is theirs to read after a sync.
    other = f"{T.BACKBONE_MODEL}-grid-cell"
    with as_user("admin"):
        register_tiny_backbone(other)
    with as_user("acme"):
        client = MlflowClient(url, registry_uri=url)
        assert refused(lambda: client.get_registered_model(other)) == "PERMISSION_DENIED"
    result = unisrec(["tenants", "sync"], "admin", url)
    assert result.returncode == 0 and other in json.loads(result.stdout)["backbones"]
    with as_user("acme"):
        assert client.get_registered_model(other).name == other


def test_the_endpoint_serves_with_the_read_only_user(platform):
    import ray
    from ray import serve

    from serving.endpoint import EndpointConfig, start
    from unisrec.runtime import ensure_ray

    history = ["acme-i0004", "acme-i0005"]
    with as_user(None):
        ensure_ray()  # Ray (if this test starts it) runs without the serving user's password
    with as_user("serving"):  # the endpoint passes its user on to its replicas
        url = start(
            EndpointConfig(tenants=["acme"], port=free_port(), tracking_uri=platform["url"])
        )
    try:
        request = urllib.request.Request(
            f"{url}/recommend/acme",
            data=json.dumps({"history": history, "k": 5}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(err.read()[:2000]) from err
        assert answer["version"] == "1"
        assert [i["key"] for i in answer["items"]] == local_top_k(platform["acme"], history, 5)
        # ... its replicas got the password, but Ray shows it nowhere.
        assert ray_places_holding_password("serving") == []
    finally:
        serve.shutdown()
        ray.shutdown()


def ray_places_holding_password(user: str) -> list[str]:
    """Where the local Ray (its state API, job list, session logs) shows ``user``'s password."""
    import ray
    from helpers_secrets import ray_places_holding

    dashboard = f"http://{ray._private.worker.get_dashboard_url()}"
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    return ray_places_holding(PASSWORDS[user], dashboard, session)


def test_batch_recommendations_run_as_the_read_only_user(platform, tmp_path):
    from serving.batch import BatchConfig, recommend_batch
    from unisrec.runtime import ensure_ray

    with as_user(None):
        ensure_ray()  # Ray (if this test starts it) runs without the serving user's password
    with as_user("serving"):
        record = recommend_batch(
            BatchConfig(
                tenant="acme", all_users=True, data_dir=str(platform["data"]),
                out=str(tmp_path / "recs.parquet"), k=5, tracking_uri=platform["url"],
                progress=False,
            )
        )  # fmt: skip
    assert record["version"] == "1"
    assert record["users"]["recommended"] == record["users"]["read"] > 0
    assert ray_places_holding_password("serving") == []  # the actors got it as an argument
