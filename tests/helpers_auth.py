"""Calling a tracking server with users as one of them, from the tests of tenants' walls:
in this process (:func:`as_user`) or as a ``unisrec`` command in a fresh one
(:func:`unisrec_as`), and reading what a refused call said."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from mlflow.exceptions import MlflowException

from unisrec import access

CREDENTIALS = (access.USERNAME_ENV, access.PASSWORD_ENV)


@contextmanager
def as_user(user: str | None, password: str | None = None):
    """MLflow's client in this process (and what it starts) calls as ``user`` with
    ``password`` (None: nobody)."""
    before = {key: os.environ.get(key) for key in CREDENTIALS}
    for key in CREDENTIALS:
        os.environ.pop(key, None)
    if user:
        os.environ.update(dict(zip(CREDENTIALS, (user, password))))
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def unisrec_as(
    args: list[str], url: str, user: str | None, password: str | None = None, **env
) -> subprocess.CompletedProcess:
    """``unisrec ARGS`` in a fresh process as ``user`` against the server at ``url``."""
    environ = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    environ.update(MLFLOW_TRACKING_URI=url, **env)
    if user:
        environ.update(dict(zip(CREDENTIALS, (user, password))))
    return subprocess.run(
        [sys.executable, "-m", "recipes.cli", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a refused job ends with (exit 2, no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def refused(call) -> str:
    """The error code MLflow's client raises for ``call()``."""
    with pytest.raises(MlflowException) as caught:
        call()
    return caught.value.error_code
