"""Tenants walled off in the registry: users and permissions on a tracking server with users
(``unisrec mlflow-server --auth``), managed by its admin.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$UNISREC_ADMIN_PASSWORD"
    unisrec tenants add acme --password-file acme.pw          # a tenant
    unisrec tenants add-variant acme full                     # unisrec-adaptor-acme.full
    unisrec tenants add-reader serving --password-file s.pw   # the read-only serving user
    unisrec tenants sync                                      # after a new backbone
    unisrec tenants list

Who may do what (MLflow grants per registered model and per experiment; nothing by default):

* tenant ``T``: EDIT on its registered model ``unisrec-adaptor-T`` (and on each
  ``unisrec-adaptor-T.<variant>`` the admin adds) and on its experiment
  ``unisrec-finetune-T`` (fine-tune, register versions, move aliases, set tags; not delete).
  READ on every backbone (``unisrec-backbone``, ``unisrec-backbone-*`` on which an admin or
  a pretraining user, role ``unisrec-pretrainers``, holds MANAGE and nobody else a grant)
  and on the experiments whose runs hold their weights, through the role
  ``unisrec-tenants``. Nothing on other tenants' models or runs.
* reader (``add-reader``): READ on every tenant's adaptor models and fine-tune experiments
  and on the backbones, through the role ``unisrec-readers``: what ``unisrec serve`` needs.
* the admin: everything. Anyone else, and any call without a user: nothing (HTTP 401).

The admin creates a tenant's model and experiment, tagged ``unisrec.tenant``, when it adds
the tenant, so nobody can take the name first; an empty one another user created first is
taken back (that user's grants revoked), and one tagged for someone else, or holding
versions, aliases or runs the tenant was not given, is refused. A tenant's own grant is
made (or changed in place) before other users' are revoked. Roles
hold READ on the resources that exist when they are synced: ``add``, ``add-variant``,
``add-reader`` and ``sync`` sync them (a new backbone needs a ``sync``). A tenant's second
adaptor model, ``unisrec-adaptor-T.<variant>``, is made by the admin too (``add-variant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unisrec import access
from unisrec import tags as T
from unisrec.errors import ConfigError

TENANTS_ROLE = "unisrec-tenants"  # READ on the backbones
READERS_ROLE = "unisrec-readers"  # READ on the backbones and every tenant's models and runs
PRETRAINERS_ROLE = "unisrec-pretrainers"  # no grants: marks who may register backbones
ROLES = {
    TENANTS_ROLE: "unisrec tenants: READ on every backbone and the runs holding its weights",
    READERS_ROLE: "unisrec readers: READ on every backbone, tenant adaptor and fine-tune run",
    PRETRAINERS_ROLE: "unisrec pretraining users: the backbones they create are granted to all",
}
PAGE_SIZE = 1000  # results per search call; every search reads all pages
# Roles belong to a workspace; a server without workspaces has the one called "default".
WORKSPACE = "default"


class UserApi:
    """The auth app's REST routes this module calls (``mlflow/server/auth/routes.py``; its
    own client imports the whole server, for seconds and a deprecation warning)."""

    def __init__(self, uri: str):
        self.uri = uri

    def call(self, method: str, route: str, **body) -> dict:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        data = {"params": body} if method == "GET" else {"json": body}
        response = http_request(get_default_host_creds(self.uri), route, method, **data)
        response = verify_rest_response(response, route)
        return response.json() if response.content else {}

    def get_user(self, username: str) -> dict:
        return self.call("GET", "/api/2.0/mlflow/users/get", username=username)["user"]

    def create_user(self, username: str, password: str) -> None:
        self.call("POST", "/api/2.0/mlflow/users/create", username=username, password=password)

    def set_password(self, username: str, password: str) -> None:
        self.call(
            "PATCH", "/api/2.0/mlflow/users/update-password", username=username, password=password
        )

    def users(self) -> list[dict]:
        """Every user with its roles and their grants (a user's own grants are in its role
        ``__user_<id>__``)."""
        return self.call("GET", "/api/2.0/mlflow/users/list")["users"]

    def grant(self, username: str, resource_type: str, resource_id: str, permission: str):
        self.call(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            username=username,
            resource_type=resource_type,
            resource_id=resource_id,
            permission=permission,
        )

    def revoke(self, username: str, resource_type: str, resource_id: str) -> None:
        self.call(
            "POST",
            "/api/3.0/mlflow/users/permissions/revoke",
            username=username,
            resource_type=resource_type,
            resource_id=resource_id,
        )

    def update_grant(self, grant_id: int, permission: str) -> None:
        """Change one grant (a row of a role, the user's own included) in place."""
        self.call(
            "PATCH",
            "/api/3.0/mlflow/roles/permissions/update",
            role_permission_id=grant_id,
            permission=permission,
        )

    def roles(self, workspace: str) -> list[dict]:
        return self.call("GET", "/api/3.0/mlflow/roles/list", workspace=workspace)["roles"]

    def create_role(self, workspace: str, name: str, description: str) -> dict:
        return self.call(
            "POST",
            "/api/3.0/mlflow/roles/create",
            workspace=workspace,
            name=name,
            description=description,
        )["role"]

    def assign_role(self, username: str, role_id: int) -> None:
        self.call("POST", "/api/3.0/mlflow/roles/assign", username=username, role_id=role_id)

    def role_permissions(self, role_id: int) -> list[dict]:
        return self.call("GET", "/api/3.0/mlflow/roles/permissions/list", role_id=str(role_id))[
            "role_permissions"
        ]

    def add_role_permission(self, role_id: int, resource_type: str, pattern: str, permission: str):
        self.call(
            "POST",
            "/api/3.0/mlflow/roles/permissions/add",
            role_id=role_id,
            resource_type=resource_type,
            resource_pattern=pattern,
            permission=permission,
        )


@dataclass
class Admin:
    """Connections to a tracking server as its admin."""

    uri: str
    auth: UserApi
    client: object  # mlflow.tracking.MlflowClient


def connect(uri: str = "") -> Admin:
    """The tracking server at ``uri`` (default ``$MLFLOW_TRACKING_URI``) as its admin:
    ConfigError unless it is a server with users and the caller (``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD``) is an admin there."""
    from mlflow.tracking import MlflowClient

    from unisrec.tracking import probe_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"tenants: {uri} is not a tracking server; point MLFLOW_TRACKING_URI (or "
            "--tracking-uri) at one started with `unisrec mlflow-server --auth`"
        )
    probe_tracking_server(uri)
    user = access.server_user(uri)
    if user is None:
        raise ConfigError(
            f"tenants: the tracking server at {uri} has no users; start it with "
            "`unisrec mlflow-server --auth`"
        )
    if not user["is_admin"]:
        raise access.AccessDenied(
            f"user {user['username']!r} is not an admin of the tracking server at {uri}; run "
            f"`unisrec tenants` with the admin's {access.USERNAME_ENV} and {access.PASSWORD_ENV}"
        )
    return Admin(uri, UserApi(uri), MlflowClient(uri, registry_uri=uri))


def read_password_file(path: str | Path) -> str:
    """The password in ``path`` (one trailing newline dropped); ConfigError if the file is
    missing or the password too short for MLflow."""
    from cluster.mlflow_server import check_password

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"--password-file {path}: {err.strerror or err}") from None
    password = text[:-1] if text.endswith("\n") else text
    password = password[:-1] if password.endswith("\r") else password
    return check_password(password, f"--password-file {path}")


def add_tenant(admin: Admin, name: str, password: str) -> dict:
    """Create (or reset the password of) tenant ``name``'s user; create its registered model
    and experiment if missing; make the tenant the only non-admin user with grants on them
    (EDIT); give it the role that reads the backbones; sync the roles.

    A model or experiment another user made first is taken back only while it is empty: one
    that holds versions, aliases or runs is refused (ConfigError), since the tenant would
    otherwise be served what that user put there."""
    T.validate_tenant_name(name)
    model = T.adaptor_model_name(name)
    found_model = _tenant_model(admin, name, model, "add")  # first: a refusal changes nothing
    found_experiment = _tenant_experiment(admin, name)
    user = _ensure_user(admin, name, password)
    revoked = _give_model(admin, name, model, found_model)
    experiment_name = T.finetune_experiment_name(name)
    if found_experiment is None:
        experiment_id = admin.client.create_experiment(experiment_name, tags={T.TENANT: name})
    else:
        experiment_id = found_experiment.experiment_id
        if found_experiment.lifecycle_stage == "deleted":
            admin.client.restore_experiment(experiment_id)
        admin.client.set_experiment_tag(experiment_id, T.TENANT, name)
    _grant(admin, name, access.EXPERIMENT, experiment_id, "EDIT")  # first: never left with less
    revoked += _revoke_others(admin, name, access.EXPERIMENT, experiment_id)
    _assign(admin, name, TENANTS_ROLE)
    return {
        "tenant": name,
        "user": user,
        "model": f"{model} ({'created' if found_model is None else 'exists'})",
        "experiment": f"{experiment_name} ({'created' if found_experiment is None else 'exists'})",
        "revoked": revoked,
        **sync(admin),
    }


def add_variant(admin: Admin, tenant: str, variant: str) -> dict:
    """Create tenant ``tenant``'s registered model ``unisrec-adaptor-<tenant>.<variant>`` if
    missing (a second adaptor of the tenant: another mode or domain) with EDIT for the tenant
    only, as ``add_tenant`` does for its first model; sync the roles (readers may read it).
    A tenant cannot create it itself: the server hides from it every model nobody granted it,
    so the fine-tune cannot tell a free name from another user's."""
    model = T.variant_model_name(tenant, variant)
    found = _tenant_model(admin, tenant, model, "add-variant")
    _require_user(
        admin,
        tenant,
        "tenants add-variant",
        f"add the tenant first (`unisrec tenants add {tenant} --password-file F`)",
    )
    revoked = _give_model(admin, tenant, model, found)
    return {
        "tenant": tenant,
        "model": f"{model} ({'created' if found is None else 'exists'})",
        "revoked": revoked,
        **sync(admin),
    }


def add_reader(admin: Admin, name: str, password: str) -> dict:
    """Create (or reset the password of) a read-only user that may read every tenant's
    adaptors and the backbones (what serving needs); sync the roles."""
    T.validate_tenant_name(name)  # the same boring names as tenants
    user = _ensure_user(admin, name, password)
    _assign(admin, name, READERS_ROLE)
    return {"reader": name, "user": user, **sync(admin)}


def sync(admin: Admin, pretrain_users: list[str] | tuple[str, ...] = ()) -> dict:
    """Give the roles READ on what exists now: ``unisrec-tenants`` on the platform's
    backbones and the experiments of their runs; ``unisrec-readers`` on those and on every
    adaptor model and the experiments of its runs and every ``unisrec-finetune-*`` experiment.

    A backbone is the platform's when an admin or a pretraining user (role
    ``unisrec-pretrainers``; ``pretrain_users`` are added to it first) holds MANAGE on it, as
    its creator does, and no other user holds a grant of its own on it. Any user may create a
    model named like a backbone: the others are listed under ``refused_backbones``, granted
    to nobody."""
    for user in pretrain_users:
        _require_user(admin, user, "tenants sync --pretrain-users")
        _assign(admin, user, PRETRAINERS_ROLE)
    models = _registered_models(admin)
    users = admin.auth.users()
    backbones, refused = [], []
    for name in sorted(m for m in models if T.is_backbone_model(m)):
        why = _untrusted_backbone(users, name)
        if why:
            refused.append(f"{name} ({why})")
        else:
            backbones.append(name)
    adaptors = sorted(m for m in models if m.startswith(T.ADAPTOR_MODEL_PREFIX))
    backbone_runs = _run_experiments(admin, backbones)
    adaptor_runs = _run_experiments(admin, adaptors) | {
        e.experiment_id
        for e in _all_pages(
            admin.client.search_experiments,
            filter_string=f"name LIKE '{T.FINETUNE_EXPERIMENT_PREFIX}%'",
        )
    }
    backbone_grants = {(access.REGISTERED_MODEL, m) for m in backbones} | {
        (access.EXPERIMENT, e) for e in backbone_runs
    }
    added = 0
    added += _role_grants(admin, TENANTS_ROLE, backbone_grants)
    added += _role_grants(
        admin,
        READERS_ROLE,
        backbone_grants
        | {(access.REGISTERED_MODEL, m) for m in adaptors}
        | {(access.EXPERIMENT, e) for e in adaptor_runs},
    )
    return {
        "backbones": backbones,
        "refused_backbones": refused,
        "adaptors": adaptors,
        "role_grants_added": added,
    }


def user_rows(admin: Admin) -> list[dict[str, str]]:
    """One row per user and permission: user, kind (admin, tenant, reader, user), permission,
    resource (``registered model NAME`` / ``experiment NAME``) and where it comes from
    (``own`` for a grant to the user, else the role)."""
    from mlflow.exceptions import MlflowException

    names: dict[str, str] = {}

    def experiment_name(experiment_id: str) -> str:
        if experiment_id not in names:
            try:
                names[experiment_id] = admin.client.get_experiment(experiment_id).name
            except MlflowException:
                names[experiment_id] = f"id {experiment_id} (gone)"
        return names[experiment_id]

    rows = []
    for user in sorted(admin.auth.users(), key=lambda u: u["username"]):
        roles = user.get("roles") or []
        role_names = {r["name"] for r in roles}
        kind = (
            "admin"
            if user["is_admin"]
            else "tenant"
            if TENANTS_ROLE in role_names
            else "reader"
            if READERS_ROLE in role_names
            else "pretrainer"
            if PRETRAINERS_ROLE in role_names
            else "user"
        )
        if user["is_admin"]:
            rows.append(_row(user["username"], kind, "(all)", "everything", "admin"))
            continue
        grants = [(role, p) for role in roles for p in role.get("permissions") or []]
        if not grants:
            rows.append(_row(user["username"], kind, "-", "nothing", ""))
        for role, p in sorted(
            grants,
            key=lambda g: (g[0]["name"] in ROLES, g[1]["resource_type"], g[1]["resource_pattern"]),
        ):
            if p["resource_type"] == access.EXPERIMENT:
                resource = f"experiment {experiment_name(p['resource_pattern'])}"
            else:
                resource = f"{access.RESOURCE_WORDS.get(p['resource_type'], p['resource_type'])} {p['resource_pattern']}"
            via = "own" if _is_own_role(role, user) else role["name"]
            rows.append(_row(user["username"], kind, p["permission"], resource, via))
    return rows


def format_user_rows(rows: list[dict[str, str]]) -> str:
    columns = ("user", "kind", "permission", "on", "via")
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)


# --- the steps -------------------------------------------------------------------------


def _row(user: str, kind: str, permission: str, on: str, via: str) -> dict[str, str]:
    return {"user": user, "kind": kind, "permission": permission, "on": on, "via": via}


def _is_own_role(role: dict, user: dict) -> bool:
    """The per-user role MLflow keeps a user's own grants in (``__user_<id>__``)."""
    return role["name"] == f"__user_{user['id']}__"


def _require_user(admin: Admin, name: str, what: str, hint: str = "") -> None:
    """ConfigError unless user ``name`` exists."""
    from mlflow.exceptions import MlflowException

    try:
        admin.auth.get_user(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise ConfigError(
            f"{what}: there is no user {name!r}{'; ' + hint if hint else ''}"
        ) from None


def _ensure_user(admin: Admin, name: str, password: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        user = admin.auth.get_user(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        admin.auth.create_user(name, password)
        return "created"
    if user["is_admin"]:
        raise ConfigError(f"tenants: {name!r} is an admin user; pick another name")
    admin.auth.set_password(name, password)
    return "password set"


def _tenant_model(admin: Admin, tenant: str, name: str, command: str):
    """The tenant's registered model ``name`` if it exists (None if not); ConfigError if it is
    tagged for someone else or for nobody (then it was not made by this platform for the
    tenant), or if it is not yet the tenant's and holds versions or aliases (another user
    made it first and filled it: taking it would serve and grant that user's versions)."""
    from mlflow.exceptions import MlflowException

    try:
        model = admin.client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    owner = model.tags.get(T.TENANT)
    if owner != tenant:
        raise ConfigError(
            f"tenants: registered model {name!r} already exists and is tagged for "
            f"{'tenant ' + repr(owner) if owner else 'no tenant'}; inspect it and delete it "
            f"(as the admin) before giving it to tenant {tenant!r}"
        )
    if _has_own_grant(admin.auth.users(), tenant, access.REGISTERED_MODEL, name):
        return model  # given to the tenant before: what it holds is the tenant's
    versions = len(_all_pages(admin.client.search_model_versions, filter_string=f"name='{name}'"))
    aliases = sorted(model.aliases or {})
    if versions or aliases:
        held = [f"{versions} version{'s' if versions != 1 else ''}"]
        held += [f"alias{'es' if len(aliases) > 1 else ''} {', '.join(aliases)}"] if aliases else []
        raise ConfigError(
            f"tenants {command} {tenant}: registered model {name!r} was made by another user"
            f"{_holders_text(admin, access.REGISTERED_MODEL, name)} and holds "
            f"{' and '.join(held)}; it is not taken over with them: delete it as the admin "
            f"(MlflowClient().delete_registered_model({name!r})), then run this again"
        )
    return model


def _give_model(admin: Admin, tenant: str, name: str, found) -> list[str]:
    """Create registered model ``name`` for ``tenant`` unless ``found``; revoke every other
    non-admin user's own grant on it; grant the tenant EDIT. Returns the revoked grants."""
    if found is None:
        admin.client.create_registered_model(
            name,
            tags={T.TENANT: tenant, T.KIND: "adaptor"},
            description=f"tenant {tenant}'s adaptor (created by `unisrec tenants`)",
        )
    _grant(admin, tenant, access.REGISTERED_MODEL, name, "EDIT")  # first: never left with less
    return _revoke_others(admin, tenant, access.REGISTERED_MODEL, name)


def _tenant_experiment(admin: Admin, tenant: str):
    """The tenant's fine-tune experiment if it exists (None if not); ConfigError if it is
    tagged for another tenant, or if it is not yet the tenant's and holds runs (deleted ones
    too); an empty one, untagged or tagged for the tenant, is adopted."""
    from mlflow.entities import ViewType

    name = T.finetune_experiment_name(tenant)
    experiment = admin.client.get_experiment_by_name(name)
    if experiment is None:
        return None
    owner = experiment.tags.get(T.TENANT)
    if owner not in (None, tenant):
        raise ConfigError(
            f"tenants add {tenant}: experiment {name!r} already exists and is tagged for tenant "
            f"{owner!r}; inspect it and delete it (as the admin) before adding the tenant"
        )
    experiment_id = experiment.experiment_id
    if _has_own_grant(admin.auth.users(), tenant, access.EXPERIMENT, experiment_id):
        return experiment
    runs = len(
        _all_pages(
            admin.client.search_runs, experiment_ids=[experiment_id], run_view_type=ViewType.ALL
        )
    )
    if runs:
        raise ConfigError(
            f"tenants add {tenant}: experiment {name!r} (id {experiment_id}) was made by another "
            f"user{_holders_text(admin, access.EXPERIMENT, experiment_id)} and holds {runs} "
            f"run{'s' if runs != 1 else ''}; it is not taken over with them: delete it as the "
            f"admin and purge it (mlflow gc --experiment-ids {experiment_id}), then run this again"
        )
    return experiment


def _own_grants(users: list[dict], resource_type: str, resource_id: str) -> list[tuple[dict, dict]]:
    """``(user, grant)`` for each user's own grant (not a role's) on the resource; the user
    who created it holds MANAGE there, an admin included."""
    found = []
    for user in users:
        for role in user.get("roles") or []:
            if not _is_own_role(role, user):
                continue
            for p in role.get("permissions") or []:
                if (p["resource_type"], p["resource_pattern"]) == (resource_type, resource_id):
                    found.append((user, p))
    return found


def _has_own_grant(users: list[dict], username: str, resource_type: str, resource_id: str) -> bool:
    return any(
        user["username"] == username for user, _ in _own_grants(users, resource_type, resource_id)
    )


def _holders_text(admin: Admin, resource_type: str, resource_id: str) -> str:
    """`` (mallory holds MANAGE)``: the non-admin users with grants of their own on it."""
    held = [
        f"{user['username']} holds {p['permission']}"
        for user, p in _own_grants(admin.auth.users(), resource_type, resource_id)
        if not user["is_admin"]
    ]
    return f" ({', '.join(held)})" if held else ""


def _untrusted_backbone(users: list[dict], name: str) -> str:
    """Why registered model ``name`` is not a backbone of the platform ("" if it is): an admin
    or a pretraining user must hold MANAGE on it, and nobody else a grant of its own."""
    grants = _own_grants(users, access.REGISTERED_MODEL, name)
    trusted = [user for user, p in grants if _is_trusted(user) and p["permission"] == "MANAGE"]
    others = sorted(
        f"{user['username']}:{p['permission']}" for user, p in grants if not _is_trusted(user)
    )
    if others:
        return f"held by {', '.join(others)}: not an admin or a pretraining user"
    if not trusted:
        return "no admin or pretraining user holds MANAGE on it"
    return ""


def _is_trusted(user: dict) -> bool:
    """An admin, or a member of the role ``unisrec-pretrainers``."""
    return bool(user["is_admin"]) or any(
        role["name"] == PRETRAINERS_ROLE for role in user.get("roles") or []
    )


def _revoke_others(admin: Admin, tenant: str, resource_type: str, resource_id: str) -> list[str]:
    """Revoke every other non-admin user's own grant on the resource (someone who created it
    first holds MANAGE on it); returns ``user:PERMISSION`` of each revoked grant."""
    revoked = []
    for user, p in _own_grants(admin.auth.users(), resource_type, resource_id):
        if user["is_admin"] or user["username"] == tenant:
            continue
        admin.auth.revoke(user["username"], resource_type, resource_id)
        revoked.append(f"{user['username']}:{p['permission']}")
    return revoked


def _grant(admin: Admin, user: str, resource_type: str, resource_id: str, permission: str):
    """Give ``user`` exactly ``permission`` on the resource as a grant of its own: a new
    grant, or the one it holds changed in place (never revoked first, so a call that fails
    leaves the user what it had)."""
    held = [
        p
        for found, p in _own_grants(admin.auth.users(), resource_type, resource_id)
        if found["username"] == user
    ]
    if not held:
        admin.auth.grant(user, resource_type, resource_id, permission)
    elif held[0]["permission"] != permission:
        admin.auth.update_grant(held[0]["id"], permission)


def _role_id(admin: Admin, role: str) -> int:
    for found in admin.auth.roles(WORKSPACE):
        if found["name"] == role:
            return found["id"]
    return admin.auth.create_role(WORKSPACE, role, ROLES[role])["id"]


def _assign(admin: Admin, user: str, role: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        admin.auth.assign_role(user, _role_id(admin, role))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _role_grants(admin: Admin, role: str, want: set[tuple[str, str]]) -> int:
    """Add READ on each ``(resource_type, resource_id)`` of ``want`` the role lacks."""
    role_id = _role_id(admin, role)
    have = {
        (p["resource_type"], p["resource_pattern"]) for p in admin.auth.role_permissions(role_id)
    }
    missing = sorted(want - have)
    for resource_type, resource_id in missing:
        admin.auth.add_role_permission(role_id, resource_type, resource_id, "READ")
    return len(missing)


def _registered_models(admin: Admin) -> list[str]:
    return [m.name for m in _all_pages(admin.client.search_registered_models)]


def _all_pages(search, **kwargs) -> list:
    """Every result of an MLflow client ``search_*`` call, page after page (a server returns
    at most one page per call, however many results it holds)."""
    found, token = [], None
    while True:
        page = search(max_results=PAGE_SIZE, page_token=token, **kwargs)
        found += list(page)
        token = page.token
        if not token:
            return found


def _run_experiments(admin: Admin, models: list[str]) -> set[str]:
    """The experiments of the runs that logged the models' versions (where their files are)."""
    from mlflow.exceptions import MlflowException

    runs: dict[str, str | None] = {}
    for name in models:
        for version in _all_pages(
            admin.client.search_model_versions, filter_string=f"name='{name}'"
        ):
            if version.run_id and version.run_id not in runs:
                try:
                    runs[version.run_id] = admin.client.get_run(version.run_id).info.experiment_id
                except MlflowException:
                    runs[version.run_id] = None  # the run was deleted
    return {e for e in runs.values() if e}
