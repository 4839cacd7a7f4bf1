"""Users of the tracking server: who a job runs as, what the server lets it do, and a refused
call as one line that names the missing permission.

A tracking server started with ``unisrec mlflow-server --auth`` (MLflow's basic-auth app)
answers every call as some user, and grants each user a permission per experiment and per
registered model: ``READ`` < ``EDIT`` (log runs, register versions, move aliases, set tags)
< ``MANAGE`` (delete, grant). Jobs take credentials the way MLflow does, from
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``. A refused call is HTTP 403
(``PERMISSION_DENIED``); a missing or wrong password is HTTP 401 (``UNAUTHENTICATED``).
Processes a job starts elsewhere (Ray actors, a submitted job) get the user as a
:class:`Credentials` argument or a private credentials file, never as environment variables
in a Ray ``runtime_env`` (see the end of this module).

Jobs check what they need before they change anything (:func:`require`), and wrap the calls
that may still be refused in :func:`needs`, so a job ends with one
``error: user 'acme' lacks EDIT on registered model 'unisrec-adaptor-globex'`` instead of a
traceback and a half-done registration. On a store without users (sqlite, a server without
``--auth``) every check passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from unisrec.errors import ConfigError

USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
# MLflow's permissions, weakest first (USE is for GenAI resources; NO_PERMISSIONS = nothing).
PERMISSIONS = ("NO_PERMISSIONS", "READ", "USE", "EDIT", "MANAGE")
# What the server calls the resources, and what a message calls them.
REGISTERED_MODEL = "registered_model"
EXPERIMENT = "experiment"
RESOURCE_WORDS = {REGISTERED_MODEL: "registered model", EXPERIMENT: "experiment"}
# The auth app's routes (mlflow/server/auth/routes.py); a server without it answers 404.
CURRENT_USER = "/api/2.0/mlflow/users/current"
USER_PERMISSION = "/api/3.0/mlflow/users/permissions/get"


class AccessDenied(ConfigError):
    """The tracking server refused this user a call; the message names the user, the
    permission and the resource (or says the credentials were not accepted)."""


def tracking_user() -> str:
    """The user MLflow's client sends (``$MLFLOW_TRACKING_USERNAME``, else MLflow's
    credentials file), or ``anonymous``."""
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username or "anonymous"


def tracking_credentials() -> dict[str, str]:
    """``{MLFLOW_TRACKING_USERNAME: ..., MLFLOW_TRACKING_PASSWORD: ...}`` for the user this
    process calls the tracking server as (from the environment or MLflow's credentials
    file), for processes started elsewhere that must call as the same user; ``{}`` for
    nobody."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if not creds.username:
        return {}
    return {USERNAME_ENV: creds.username, PASSWORD_ENV: creds.password or ""}


def denied(permission: str, resource_type: str, name: str, hint: str = "") -> AccessDenied:
    """``user 'acme' lacks EDIT on registered model 'unisrec-adaptor-globex'``."""
    what = RESOURCE_WORDS.get(resource_type, resource_type)
    line = f"user {tracking_user()!r} lacks {permission} on {what} {name!r}"
    return AccessDenied(f"{line} ({hint})" if hint else line)


def not_authenticated(uri: str) -> AccessDenied:
    if tracking_user() != "anonymous":
        return AccessDenied(
            f"the tracking server at {uri} did not accept user {tracking_user()!r} "
            f"(check {USERNAME_ENV} and {PASSWORD_ENV})"
        )
    return AccessDenied(
        f"the tracking server at {uri} needs a user: set {USERNAME_ENV} and {PASSWORD_ENV}"
    )


def refusal_status(err: BaseException) -> int | None:
    """401 or 403 when ``err`` is the tracking server refusing a call (a registry or tracking
    call, or an artifact download), else None."""
    code = getattr(err, "error_code", None)
    if code == "PERMISSION_DENIED":
        return 403
    if code == "UNAUTHENTICATED":
        return 401
    status = getattr(getattr(err, "response", None), "status_code", None)  # requests.HTTPError
    return status if status in (401, 403) else None


def refusal_message(err: BaseException, uri: str = "") -> str | None:
    """One line for a refused call no :func:`needs` block named (the CLI's last resort), or
    None when ``err`` is not a refusal."""
    status = refusal_status(err)
    if status == 401:
        return str(not_authenticated(uri or _tracking_uri()))
    if status == 403:
        url = getattr(getattr(err, "response", None), "url", None)  # requests.HTTPError
        call = (
            urlsplit(url).path
            if url
            else str(err).split(" failed with", 1)[0].removeprefix("API request to endpoint ")
        )
        return (
            f"user {tracking_user()!r} lacks a permission the tracking server requires for "
            f"{call.strip()[:200]} (HTTP 403); `unisrec tenants list` shows who may do what"
        )
    return None


@contextmanager
def needs(permission: str, resource_type: str, name: str, hint: str = "") -> Iterator[None]:
    """Turn the server refusing a call in the block into :class:`AccessDenied` saying the
    block needs ``permission`` on the resource (401: the credentials were not accepted)."""
    try:
        yield
    except Exception as err:
        status = refusal_status(err)
        if status == 403:
            raise denied(permission, resource_type, name, hint) from err
        if status == 401:
            raise not_authenticated(_tracking_uri()) from err
        raise


def server_user(uri: str = "") -> dict | None:
    """``{"username", "is_admin"}`` of the caller as the tracking server sees it; None when
    the store has no users (not an http server, or a server without ``--auth``)."""
    uri = uri or _tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    response = _get(uri, CURRENT_USER)
    if response.status_code == 401:
        raise not_authenticated(uri)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    user = response.json()["user"]
    return {"username": user["username"], "is_admin": bool(user.get("is_admin"))}


def permission_on(resource_type: str, resource_id: str, uri: str = "") -> str:
    """The caller's effective permission on one experiment (by id) or registered model (by
    name), as the server resolves it for a real request: ``MANAGE`` for an admin."""
    uri = uri or _tracking_uri()
    user = server_user(uri)
    if user is None or user["is_admin"]:
        return "MANAGE"
    response = _get(
        uri,
        USER_PERMISSION,
        {"username": user["username"], "resource_type": resource_type, "resource_id": resource_id},
    )
    response.raise_for_status()
    return response.json()["permission"]


def require(
    permission: str, resource_type: str, resource_id: str, name: str = "", uri: str = ""
) -> None:
    """Raise :class:`AccessDenied` unless the caller holds at least ``permission`` on the
    resource (``name``: what the message calls it, default ``resource_id``). Passes on a
    store without users."""
    have = permission_on(resource_type, resource_id, uri)
    if PERMISSIONS.index(have if have in PERMISSIONS else "NO_PERMISSIONS") < PERMISSIONS.index(
        permission
    ):
        raise denied(permission, resource_type, name or resource_id, f"it has {have}")


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _get(uri: str, endpoint: str, params: dict | None = None):
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(
        get_default_host_creds(uri), endpoint, "GET", params=params, max_retries=0, timeout=10
    )


# --- credentials for processes started elsewhere ------------------------------------------
# A password never travels in a Ray runtime_env's env_vars (Ray shows those in its dashboard,
# `ray job list` and the state API), on a command line or in a log. Actors get a
# :class:`Credentials` as a constructor argument; a submitted job gets a private package
# (runtime_env ``py_modules``) holding a credentials file that its processes read at start.
CREDENTIALS_PACKAGE_ENV = "UNISREC_TRACKING_CREDENTIALS"  # the package's name, not a secret
CREDENTIALS_FILE = "credentials"  # in the package; MLflow's credentials-file format
SETUP_HOOK = "unisrec.access.load_credentials_package"  # Ray runs it in every worker


class Credentials:
    """A tracking user and its password for another process; its text form (repr, str: what
    Ray and logs show of an argument) names the user only. Not a dataclass on purpose: Ray
    Data turns dataclass arguments into dicts for its dashboard."""

    __slots__ = ("username", "_password")

    def __init__(self, username: str, password: str):
        self.username = username
        self._password = password

    @classmethod
    def current(cls) -> Credentials | None:
        """This process's tracking user (environment or MLflow's credentials file), or None."""
        creds = tracking_credentials()
        return cls(creds[USERNAME_ENV], creds[PASSWORD_ENV]) if creds else None

    def use(self) -> None:
        """Call the tracking server as this user from now on, in this process."""
        import os

        os.environ[USERNAME_ENV] = self.username
        os.environ[PASSWORD_ENV] = self._password

    def write(self, path) -> None:
        """MLflow's credentials-file format, readable by this user only (0600)."""
        import os

        text = (
            "[mlflow]\n"
            f"{USERNAME_ENV.lower()} = {self.username}\n"
            f"{PASSWORD_ENV.lower()} = {self._password}\n"
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)

    def __reduce__(self):
        return (Credentials, (self.username, self._password))

    def __repr__(self) -> str:
        return f"Credentials(user {self.username!r}, password hidden)"

    __str__ = __repr__


def use_credentials(credentials: Credentials | None) -> None:
    """What an actor calls first with the credentials it was given (None: keep its own)."""
    if credentials is not None:
        credentials.use()


@contextmanager
def credentials_package(credentials: Credentials | None) -> Iterator[dict]:
    """A Ray ``runtime_env`` part that gives a submitted job, and every worker it starts,
    ``credentials`` (``{}`` for None): a package in a private temporary folder (0700) with
    the credentials file (0600), uploaded with the job as ``py_modules``; the package's name
    in :data:`CREDENTIALS_PACKAGE_ENV`; :data:`SETUP_HOOK` as the workers' setup hook. The
    folder is removed when the block ends (after the upload)."""
    import secrets
    import shutil
    import tempfile
    from pathlib import Path

    if credentials is None:
        yield {}
        return
    folder = Path(tempfile.mkdtemp(prefix="unisrec-credentials-"))  # 0700
    try:
        name = f"unisrec_credentials_{secrets.token_hex(8)}"
        (folder / name).mkdir(mode=0o700)
        credentials.write(folder / name / CREDENTIALS_FILE)
        yield {
            "py_modules": [str(folder / name)],
            "env_vars": {CREDENTIALS_PACKAGE_ENV: name},
            "worker_process_setup_hook": SETUP_HOOK,
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_credentials_package() -> bool:
    """If this process was started with a credentials package (a submitted job's driver, or
    one of its Ray workers: :data:`SETUP_HOOK`) and has no tracking user of its own, call as
    the package's user from now on; True if it did."""
    import configparser
    import os
    import sys
    from pathlib import Path

    name = os.environ.get(CREDENTIALS_PACKAGE_ENV, "")
    if not name or os.environ.get(USERNAME_ENV):
        return False
    for entry in [os.getcwd(), *sys.path]:
        path = Path(entry or ".", name, CREDENTIALS_FILE)
        if path.is_file():
            path.chmod(0o600)  # unpacked by Ray with its default mode
            config = configparser.ConfigParser(interpolation=None)
            config.read(path, encoding="utf-8")
            section = config["mlflow"]
            Credentials(section[USERNAME_ENV.lower()], section.get(PASSWORD_ENV.lower(), "")).use()
            return True
    return False
