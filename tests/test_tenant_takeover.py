"""What another user on a tracking server with users (``unisrec mlflow-server --auth``) cannot
make the admin's ``unisrec tenants`` commands do: adopt a name it filled first, grant every
tenant a model it named like a backbone, leave a tenant with nothing after a failed grant, or
miss what lies past a search's first page; and what a local user cannot read from the
server's files.

One module-scoped server on 127.0.0.1; user ``mallory`` is a plain user (MLflow lets any user
create registered models and experiments), ``trainer`` registers backbones.
"""

from __future__ import annotations

import json
import stat
import subprocess

import pytest
from helpers_auth import as_user as calling_as
from helpers_auth import one_error_line, refused, unisrec_as
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster import accounts
from cluster.accounts import add_reader, add_tenant, connect
from cluster.mlflow_server import AuthSettings, start_server, stop_server
from unisrec import access
from unisrec import tags as T

pytestmark = pytest.mark.slow


def password(user: str) -> str:
    return f"{user}-password-0001"


def as_user(user: str | None):
    """MLflow's client in this process calls as ``user`` (None: nobody)."""
    return calling_as(user, password(user) if user else None)


def unisrec(args: list[str], user: str, url: str) -> subprocess.CompletedProcess:
    """``unisrec ARGS`` in a fresh process as ``user`` against the server at ``url``."""
    return unisrec_as(args, url, user, password(user))


def add_tenant_command(server: dict, name: str) -> subprocess.CompletedProcess:
    path = server["root"] / f"{name}.pw"
    path.write_text(password(name) + "\n")
    return unisrec(["tenants", "add", name, "--password-file", str(path)], "admin", server["url"])


def own_grants(admin, resource_type: str, resource_id: str) -> dict[str, str]:
    """Each user's own grant (not a role's) on the resource, as the auth store holds it."""
    found = {}
    for user in admin.auth.users():
        for role in user.get("roles") or []:
            if role["name"] != f"__user_{user['id']}__":
                continue
            for p in role.get("permissions") or []:
                if (p["resource_type"], p["resource_pattern"]) == (resource_type, resource_id):
                    found[user["username"]] = p["permission"]
    return found


def own_permission(admin, user: str, resource_type: str, resource_id: str) -> str | None:
    return own_grants(admin, resource_type, resource_id).get(user)


def role_grants(admin, role: str) -> set[tuple[str, str]]:
    role_id = accounts._role_id(admin, role)
    return {
        (p["resource_type"], p["resource_pattern"]) for p in admin.auth.role_permissions(role_id)
    }


def fill_model(client: MlflowClient, name: str, experiment: str, alias: str = "") -> str:
    """A run in ``experiment`` with a small file, registered as a version of ``name``
    (created if missing); returns the run id."""
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(name)
    except MlflowException:
        tenant = name.removeprefix(T.ADAPTOR_MODEL_PREFIX).split(".")[0]
        client.create_registered_model(name, tags={T.TENANT: tenant})
    version = client.create_model_version(
        name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return run.info.run_id


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("takeover")
    running = start_server(root / "mlflow", auth=AuthSettings(admin_password=password("admin")))
    try:
        with as_user("admin"):
            admin = connect(running.url)
            for user in ("mallory", "trainer"):
                admin.auth.create_user(user, password(user))
            add_reader(admin, "serving", password("serving"))
            client = MlflowClient(running.url, registry_uri=running.url)
            for cell in range(3):  # a backbone whose versions' runs lie in three experiments
                fill_model(client, T.BACKBONE_MODEL, f"unisrec-pretrain-{cell}", alias="current")
        yield {"root": root, "url": running.url, "mlflow_root": root / "mlflow"}
    finally:
        stop_server(running)


def client_as(user: str, url: str) -> MlflowClient:
    with as_user(user):
        return MlflowClient(url, registry_uri=url)


# --- 1. names taken first ----------------------------------------------------------------


def test_a_squatted_tenant_model_with_a_production_version_is_refused_and_nothing_of_it_granted(
    server,
):
    url = server["url"]
    model = T.adaptor_model_name("acme")
    with as_user("mallory"):  # before acme exists: a version, and production on it
        fill_model(client_as("mallory", url), model, "mallory-runs", alias=T.PRODUCTION)
    result = add_tenant_command(server, "acme")
    line = one_error_line(result)
    print(f"\nsquatter drill: unisrec tenants add acme -> exit {result.returncode}\n{line}")
    assert line == (
        f"error: tenants add acme: registered model '{model}' was made by another user "
        "(mallory holds MANAGE) and holds 1 version and alias production; it is not taken over "
        f"with them: delete it as the admin (MlflowClient().delete_registered_model('{model}')), "
        "then run this again"
    )
    with as_user("admin"):
        admin = connect(url)
        assert "acme" not in {u["username"] for u in admin.auth.users()}  # nothing created
        for role in (accounts.TENANTS_ROLE, accounts.READERS_ROLE):
            assert (access.REGISTERED_MODEL, model) not in role_grants(admin, role)
        held = own_grants(admin, access.REGISTERED_MODEL, model)
        assert {user: p for user, p in held.items() if user != "admin"} == {"mallory": "MANAGE"}
    with as_user("serving"):  # the serving user cannot read it: nothing to serve
        client = MlflowClient(url, registry_uri=url)
        assert refused(lambda: client.get_registered_model(model)) == "PERMISSION_DENIED"


def test_a_squatted_finetune_experiment_with_runs_is_refused(server):
    url = server["url"]
    experiment = T.finetune_experiment_name("hooli")
    with as_user("mallory"):
        client = MlflowClient(url)
        experiment_id = client.create_experiment(experiment, tags={T.TENANT: "hooli"})
        client.set_terminated(client.create_run(experiment_id).info.run_id)
    line = one_error_line(add_tenant_command(server, "hooli"))
    assert line == (
        f"error: tenants add hooli: experiment '{experiment}' (id {experiment_id}) was made by "
        "another user (mallory holds MANAGE) and holds 1 run; it is not taken over with them: "
        f"delete it as the admin and purge it (mlflow gc --experiment-ids {experiment_id}), "
        "then run this again"
    )


def test_a_squatted_variant_with_a_version_is_refused(server):
    url = server["url"]
    assert add_tenant_command(server, "umbrella").returncode == 0
    variant = T.variant_model_name("umbrella", "full")
    with as_user("mallory"):
        fill_model(client_as("mallory", url), variant, "mallory-runs")
    line = one_error_line(unisrec(["tenants", "add-variant", "umbrella", "full"], "admin", url))
    assert line.startswith(
        f"error: tenants add-variant umbrella: registered model '{variant}' was made by another "
        "user (mallory holds MANAGE) and holds 1 version;"
    ), line


def test_an_empty_squatted_name_is_taken_back_and_a_tenants_own_versions_stay_its_own(server):
    url = server["url"]
    model = T.adaptor_model_name("wayne")
    with as_user("mallory"):
        MlflowClient(url, registry_uri=url).create_registered_model(model, tags={T.TENANT: "wayne"})
    result = add_tenant_command(server, "wayne")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["revoked"] == ["mallory:MANAGE"]
    # The tenant's own versions do not stop the admin from running `add` again.
    with as_user("wayne"):
        fill_model(
            client_as("wayne", url), model, T.finetune_experiment_name("wayne"), "production"
        )
    result = add_tenant_command(server, "wayne")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["model"] == f"{model} (exists)"


# --- 2. backbones the platform registered ---------------------------------------------------


def test_sync_grants_only_backbones_an_admin_or_a_pretraining_user_registered(server):
    url = server["url"]
    fake, trained = f"{T.BACKBONE_MODEL}-x", f"{T.BACKBONE_MODEL}-trained"
    with as_user("mallory"):
        fill_model(client_as("mallory", url), fake, "mallory-runs", alias="current")
    with as_user("trainer"):
        fill_model(client_as("trainer", url), trained, "trainer-runs", alias="current")
    result = unisrec(["tenants", "sync"], "admin", url)
    assert result.returncode == 0, result.stderr[-3000:]
    with as_user("umbrella"):  # a tenant: the platform's backbone, not mallory's
        client = MlflowClient(url, registry_uri=url)
        assert client.get_registered_model(T.BACKBONE_MODEL).name == T.BACKBONE_MODEL
        assert refused(lambda: client.get_registered_model(fake)) == "PERMISSION_DENIED"
        assert refused(lambda: client.get_registered_model(trained)) == "PERMISSION_DENIED"
    synced = json.loads(result.stdout)
    assert synced["backbones"] == [T.BACKBONE_MODEL]
    assert synced["refused_backbones"] == [
        f"{trained} (held by trainer:MANAGE: not an admin or a pretraining user)",
        f"{fake} (held by mallory:MANAGE: not an admin or a pretraining user)",
    ]
    # The admin names the pretraining user once; later syncs (and adds) remember it.
    result = unisrec(["tenants", "sync", "--pretrain-users", "trainer"], "admin", url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["backbones"] == [T.BACKBONE_MODEL, trained]
    result = unisrec(["tenants", "sync"], "admin", url)
    assert json.loads(result.stdout)["backbones"] == [T.BACKBONE_MODEL, trained]
    with as_user("umbrella"):
        assert client.get_registered_model(trained).name == trained
        assert refused(lambda: client.get_registered_model(fake)) == "PERMISSION_DENIED"
    line = one_error_line(unisrec(["tenants", "sync", "--pretrain-users", "nobody"], "admin", url))
    assert line == "error: tenants sync --pretrain-users: there is no user 'nobody'"


# --- 3. grant first, then revoke -------------------------------------------------------------


def test_a_failed_grant_leaves_the_tenant_the_grant_it_had(server, monkeypatch):
    url = server["url"]
    model = T.adaptor_model_name("stark")
    with as_user("admin"):
        admin = connect(url)
        add_tenant(admin, "stark", password("stark"))
        admin.auth.revoke("stark", access.REGISTERED_MODEL, model)
        admin.auth.grant("stark", access.REGISTERED_MODEL, model, "READ")
        real_call = accounts.UserApi.call

        def grants_fail(self, method, route, **body):
            """The server takes revokes but fails every grant that would change something."""
            if route.endswith("/roles/permissions/update"):
                raise MlflowException("injected: the grant failed", error_code="INTERNAL_ERROR")
            if route.endswith("/users/permissions/grant"):
                held = own_permission(admin, body["username"], body["resource_type"], body["resource_id"])  # fmt: skip
                if held is None:
                    raise MlflowException("injected: the grant failed", error_code="INTERNAL_ERROR")
            return real_call(self, method, route, **body)

        monkeypatch.setattr(accounts.UserApi, "call", grants_fail)
        with pytest.raises(MlflowException, match="injected"):
            add_tenant(admin, "stark", password("stark"))
        monkeypatch.setattr(accounts.UserApi, "call", real_call)
        assert own_permission(admin, "stark", access.REGISTERED_MODEL, model) == "READ"
        add_tenant(admin, "stark", password("stark"))  # the next try gives it EDIT in place
        assert own_permission(admin, "stark", access.REGISTERED_MODEL, model) == "EDIT"


# --- 4. every page --------------------------------------------------------------------------


class SmallPages:
    """An MLflow client whose server answers at most two results per search call."""

    def __init__(self, client: MlflowClient):
        self.client = client

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if not name.startswith("search_"):
            return method

        def search(*args, max_results=None, **kwargs):
            return method(*args, max_results=min(max_results or 2, 2), **kwargs)

        return search


def test_sync_reads_every_page_of_every_search(server):
    url = server["url"]
    with as_user("admin"):
        admin = connect(url)
        for tenant in ("p1", "p2", "p3"):
            add_tenant(admin, tenant, password(tenant))
        client = MlflowClient(url, registry_uri=url)
        backbone_experiments = {
            client.get_run(v.run_id).info.experiment_id
            for v in client.search_model_versions(f"name='{T.BACKBONE_MODEL}'")
        }
        finetunes = {
            e.experiment_id
            for e in client.search_experiments(
                filter_string=f"name LIKE '{T.FINETUNE_EXPERIMENT_PREFIX}%'"
            )
        }
        assert len(backbone_experiments) == 3 and len(finetunes) >= 3
        for role in (accounts.TENANTS_ROLE, accounts.READERS_ROLE):  # start from nothing
            role_id = accounts._role_id(admin, role)
            for p in admin.auth.role_permissions(role_id):
                admin.auth.call(
                    "DELETE", "/api/3.0/mlflow/roles/permissions/remove",
                    role_permission_id=p["id"],
                )  # fmt: skip
        small = accounts.Admin(admin.uri, admin.auth, SmallPages(client))
        accounts.sync(small)
        tenants_role = role_grants(admin, accounts.TENANTS_ROLE)
        readers_role = role_grants(admin, accounts.READERS_ROLE)
    assert {(access.EXPERIMENT, e) for e in backbone_experiments} <= tenants_role
    assert {(access.EXPERIMENT, e) for e in finetunes} <= readers_role


# --- 5. the server's files --------------------------------------------------------------------


def test_the_servers_store_and_artifacts_are_private_to_its_user(server, tmp_path):
    url, root = server["url"], server["mlflow_root"]
    with as_user("admin"):
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("private-files"))
        client.log_text(run.info.run_id, "secret weights", "model/weights.txt")
    assert list(root.rglob("weights.txt"))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(root)} is {oct(mode)}"
