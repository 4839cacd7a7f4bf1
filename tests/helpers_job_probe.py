"""Run as a submitted Ray job's entrypoint (``python tests/helpers_job_probe.py URL``): the
CLI once (it reads the job's credentials package first), then a Ray task; prints one JSON
line saying as whom each called the tracking server at URL and how many command lines on the
machine hold the password. Never prints the password."""

from __future__ import annotations

import json
import os
import sys

import ray

from recipes.cli import main
from unisrec.access import PASSWORD_ENV, server_user


@ray.remote(num_cpus=0)
def worker_view(url: str) -> dict:
    from pathlib import Path

    password = os.environ.get(PASSWORD_ENV, "").encode()  # set by the job's setup hook
    holding = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            holding += bool(password) and password in cmdline.read_bytes()
        except OSError:
            continue  # ended while we looked
    return {
        "worker_user": server_user(url)["username"],
        "worker_has_password": bool(password),
        "command_lines_with_password": holding,
    }


if __name__ == "__main__":
    url = sys.argv[1]
    code = main(["models", "list", "--tracking-uri", url])
    ray.init()
    print("PROBE " + json.dumps({"cli_exit": code, "driver_user": server_user(url)["username"],
                                 **ray.get(worker_view.remote(url))}), flush=True)  # fmt: skip
